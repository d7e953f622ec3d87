"""F.linear against oneDNN on reordered weights (layers/cpu_packed.py), at the SmolLM2 shapes and
several row counts, per dtype (float32 by default): ms per product, best of a few runs, this
process's threads. A dtype oneDNN cannot reorder on this CPU shows "-" for oneDNN.

    PYTHONPATH=. .venv/bin/python scripts/cpu_linear_bench.py [float32 bfloat16 ...]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from pagedllm.layers.cpu_packed import packed_linear, packed_weight

SHAPES = {"LM head": (49152, 576), "gate_up": (3072, 576), "down": (576, 1536), "qkv": (960, 576)}
ROWS = (1, 64, 512, 2048)  # the LM head scores one row a sequence: up to 64 of them


def _ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    print(f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for dtype in [getattr(torch, name) for name in sys.argv[1:] or ["float32"]]:
        for label, (n, k) in SHAPES.items():
            weight = torch.randn(n, k).to(dtype)
            packed = packed_weight(weight)
            for rows in [r for r in ROWS if label != "LM head" or r <= 64]:
                x = torch.randn(rows, k).to(dtype)
                plain = _ms(lambda: F.linear(x, weight))
                onednn = _ms(lambda: packed_linear(x, packed)) if packed is not None else float("nan")
                print(f"{str(dtype)[6:]:8s} {label:8s} {n}x{k} rows {rows:5d}: F.linear {plain:8.2f} ms  "
                      f"oneDNN {onednn:8.2f} ms  {plain / onednn:.2f}x", flush=True)


if __name__ == "__main__":
    main()
