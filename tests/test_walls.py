"""The walls between the parts, checked in fresh processes so that nothing imported by an
earlier test can hide a breach (see docs/engine.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer, child_pids, pid_alive, port_is_free

ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = ("pagedllm.worker", "pagedllm.models", "pagedllm.layers", "pagedllm.attention", "pagedllm.executor")


def modules_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_pagedllm_is_cheap():
    loaded = modules_after("import pagedllm; from pagedllm import SamplingParams")
    assert "torch" not in loaded
    assert not any(m.startswith(MODEL_CODE + ("pagedllm.engine",)) for m in loaded)


def test_core_imports_no_torch():
    loaded = modules_after(
        "import pagedllm.core.scheduler, pagedllm.core.block_manager, pagedllm.core.interface, pagedllm.config"
    )
    assert "torch" not in loaded


def test_http_front_end_imports_no_model_code():
    loaded = modules_after(
        "import pagedllm.entrypoints.openai.api_server, pagedllm.engine.async_client, pagedllm.engine.messages, "
        "pagedllm.metrics"
    )
    assert "torch" not in loaded
    assert not [m for m in loaded if m.startswith(MODEL_CODE)]


def test_engine_reaches_the_model_only_through_the_executor():
    """No module of pagedllm/engine imports the worker, the models, the layers or the attention
    backends (the executor is the one door)."""
    forbidden = ("pagedllm.worker", "pagedllm.models", "pagedllm.layers", "pagedllm.attention")
    breaches = []
    for path in (ROOT / "pagedllm" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
            breaches += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert not breaches


@pytest.mark.parametrize("api_server_count", [1, 2])
def test_running_server_processes_load_no_torch(api_server_count):
    """The live HTTP process, after serving a request: no libtorch mapped into it. With two API
    server processes: neither of them, nor their parent."""
    server = RemoteServer([*DEFAULT_ARGS, "--api-server-count", str(api_server_count)])
    try:
        for _ in range(2 * api_server_count):
            r = httpx.post(server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200
        http_pids = [server.process.pid, *server.api_server_pids().values()]
        assert len(http_pids) == api_server_count + (api_server_count > 1)
        for pid in http_pids:
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), pid
        everything = [*server.api_server_pids().values(), *(p for pid in http_pids for p in child_pids(pid))]
    finally:
        server.close()
    assert server.process.returncode == 0
    deadline = time.monotonic() + 5  # multiprocessing's resource tracker ends just after the server
    while [pid for pid in everything if pid_alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in everything if pid_alive(pid)]  # SIGTERM stopped every process
    assert port_is_free(server.port)
