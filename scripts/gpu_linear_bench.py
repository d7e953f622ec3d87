"""The decode GEMV (layers/triton_linear.py) on the GPU: checked against a float32 product and
timed against cuBLAS on the matrices of the benchmark models, then a llama-8b-shaped model's
greedy tokens with and without it.

    PYTHONPATH=. python scripts/gpu_linear_bench.py [--sweep] [--skip kernels,model]

kernels: for each matrix (smollm2-135m, llama-1b, llama-8b at TP=1, llama-8b at TP=2) and 1, 4
  and 8 rows, bf16: the largest error against the float32 product must be within 1.5x cuBLAS's
  own (PASS/FAIL); then microseconds a product of cuBLAS (F.linear) and of the GEMV with
  launch_config's shape, each replayed in a CUDA graph over distinct copies of the matrix (at
  least 300 MB, so that no copy is read from L2). --sweep also times every shape of a grid and
  prints the best: the data launch_config's rule was fitted to.
model: a 4-layer llama-8b (random weights, scripts/gpu_tp_bench.py) generates greedy tokens
  with top-5 logprobs with PAGEDLLM_DECODE_GEMV=1 and =0; they must agree under vLLM's
  check_logprobs_close rule.

Every row is printed and appended as a JSON line to $OUT/linear.jsonl (or ./linear.jsonl); the
exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import gpu_check_attention as attn_check  # noqa: E402

MATRICES = {  # name: (N, K) of W
    "smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate_up": (3072, 576), "smollm2 down": (576, 1536),
    "smollm2 lm_head": (49152, 576),
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192), "1b lm_head": (128256, 2048),
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336), "8b lm_head": (128256, 4096),
    "8b/2 qkv": (3072, 4096), "8b/2 o": (4096, 2048), "8b/2 gate_up": (14336, 4096), "8b/2 down": (4096, 7168),
    "8b/2 lm_head": (64128, 4096),
}  # fmt: skip
SWEEP = [(bn, bk, s) for bn in (32, 64, 128) for bk in (64, 128, 256) for s in (1, 2, 4, 8)]


def graph_us(fn, copies: list[torch.Tensor]) -> float:
    """Microseconds a call of fn(w): the median replay of a CUDA graph of fn over all copies
    (gpu_check_attention.time_us), divided by their number."""
    return attn_check.time_us(lambda: [fn(w) for w in copies], reps=20, graph=True) / len(copies)


def kernels(out, sweep: bool) -> bool:
    from pagedllm.layers import triton_linear

    ok = True
    for name, (n, k) in MATRICES.items():
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(max(8, -(-300_000_000 // (2 * n * k))))]
        for rows in (1, 4, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            exact = F.linear(x.float(), copies[0].float(), bias.float())
            err_cublas = (F.linear(x, copies[0], bias).float() - exact).abs().max().item()
            err = (triton_linear.linear(x, copies[0], bias).float() - exact).abs().max().item()
            passed = err <= 1.5 * err_cublas + 1e-3
            ok &= passed
            row = dict(matrix=name, rows=rows, MB=round(2 * n * k / 1e6, 1), check="PASS" if passed else "FAIL",
                       err=round(err, 5), err_cublas=round(err_cublas, 5), config=triton_linear.launch_config(n, k),
                       takes=triton_linear.takes(x, copies[0]),
                       cublas_us=round(graph_us(lambda w: F.linear(x, w), copies), 2),
                       gemv_us=round(graph_us(lambda w: triton_linear.linear(x, w), copies), 2))
            if sweep:
                timed = []
                for config in SWEEP:
                    if k // config[2] < config[1]:
                        continue
                    for stages in (3, 4):
                        try:
                            t = graph_us(lambda w: triton_linear.linear(x, w, config=config, num_stages=stages), copies)
                        except Exception:  # noqa: BLE001 - a shape that does not fit shared memory
                            continue
                        timed.append((round(t, 2), config, stages))
                row["best"] = min(timed)
            _emit(out, row)
        del copies
        torch.cuda.empty_cache()
    return ok


def model(out, workdir: str) -> bool:
    from gpu_tp_bench import compare, write_llama_checkpoint

    folder = write_llama_checkpoint("llama-8b", os.path.join(workdir, "llama-8b-4"), num_layers=4)
    results = {}
    for gemv in ("1", "0"):
        result = os.path.join(workdir, f"gemv{gemv}.json")
        env = dict(os.environ, PAGEDLLM_DECODE_GEMV=gemv)
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "gpu_tp_bench.py"), "generate",
                        "--folder", folder, "--tp", "1", "--dtype", "bfloat16", "--result", result], check=True, env=env)
        with open(result) as f:
            results[gemv] = json.load(f)
    ok, rows = compare(results["1"], results["0"], exact=False)
    _emit(out, dict(check="PASS" if ok else "FAIL", model="llama-8b, 4 layers, bf16", gemv_vs_cublas=rows))
    return ok


def _emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch shapes for each matrix")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: kernels, model")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    ok = True
    with open(os.path.join(os.environ.get("OUT", "."), "linear.jsonl"), "a") as out:
        if "kernels" not in skip:
            ok &= kernels(out, args.sweep)
        if "model" not in skip:
            with tempfile.TemporaryDirectory() as workdir:
                ok &= model(out, workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
