"""scripts/gpu_kernels.py is run by hand on a GPU machine that CI never sees: its
--interpret-smoke mode runs the same checks and timing code on tiny shapes on CPU under
Triton's interpreter, so a change that would break the GPU run breaks here first."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_kernels_script_runs_in_interpreter(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_kernels.py"), "--interpret-smoke"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r["kind"] == "check"]
    assert checks and all(r["result"] == "PASS" for r in checks)
    kernels = {r["kernel"] for r in checks}
    assert {"rms_norm+residual", "rotary_inplace", "silu_and_mul", "gelu_tanh_and_mul",
            "attention (decode + prefill)"} <= kernels
    benches = {r["kernel"] for r in rows if r["kind"] == "bench"}
    assert {"rms_norm+residual", "prefill attention", "decode attention (graph)"} <= benches
    assert any(r["kernel"].startswith("decode step") for r in rows if r["kind"] == "bench")
