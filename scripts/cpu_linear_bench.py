"""F.linear against oneDNN on reordered weights (layers/cpu_packed.py), float32, at the SmolLM2
shapes and several row counts: ms per product, best of a few runs, this process's threads.

    PYTHONPATH=. .venv/bin/python scripts/cpu_linear_bench.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pagedllm.layers.cpu_packed import packed_linear, packed_weight

SHAPES = {"LM head": (49152, 576), "gate_up": (3072, 576), "down": (576, 1536), "qkv": (960, 576)}
ROWS = (1, 8, 32, 300, 2048)


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
    for label, (n, k) in SHAPES.items():
        weight = torch.randn(n, k)
        packed = packed_weight(weight)
        for rows in ROWS:
            x = torch.randn(rows, k)
            plain, onednn = _ms(lambda: F.linear(x, weight)), _ms(lambda: packed_linear(x, packed))
            print(f"{label:8s} {n}x{k} rows {rows:5d}: F.linear {plain:8.2f} ms  oneDNN {onednn:8.2f} ms  {plain / onednn:.2f}x")


if __name__ == "__main__":
    main()
