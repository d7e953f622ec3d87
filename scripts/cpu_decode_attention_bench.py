"""Decode attention on the CPU: pagedllm's paged kernel for a step of 64 sequences, one new token
each, SmolLM2's heads (9 query, 3 kv, dim 64), contexts of 16 to 384 tokens scattered over a
cache as large as the bundled model's (30 layers of 2912 blocks, so the K/V come from memory, not
cache, as in a real step). Per layer call: ms (best of 5 passes over the 30 layers), the K/V bytes
read per second, and the error against torch's attention on the gathered context.

    PYTHONPATH=. .venv/bin/python scripts/cpu_decode_attention_bench.py [float16|float32 ...]
"""

from __future__ import annotations

import random
import sys
import time

import torch

from pagedllm.layers import cpu_ops
from pagedllm.layers.cpu_kernels import lib

HEADS, KV_HEADS, DIM, BLOCK, LAYERS, NUM_BLOCKS, SEQS = 9, 3, 64, 16, 30, 2912, 64


def reference(q, k_cache, v_cache, table, length):
    k = k_cache[table.long()].flatten(0, 1)[:length].float().repeat_interleave(HEADS // KV_HEADS, 1)
    v = v_cache[table.long()].flatten(0, 1)[:length].float().repeat_interleave(HEADS // KV_HEADS, 1)
    p = torch.einsum("hd,thd->ht", q, k).mul(DIM**-0.5).softmax(-1)
    return torch.einsum("ht,thd->hd", p, v)


def main() -> None:
    if lib() is None:
        raise SystemExit("pagedllm's CPU kernels do not run here")
    rng = random.Random(0)
    torch.manual_seed(0)
    lens = torch.tensor([rng.randint(16, 384) for _ in range(SEQS)], dtype=torch.int32)
    width = -(-int(lens.max()) // BLOCK)
    blocks = torch.randperm(NUM_BLOCKS)[: SEQS * width].view(SEQS, width).int()
    query = torch.randn(SEQS, HEADS, DIM)
    print(f"threads {torch.get_num_threads()}, contexts {int(lens.min())}-{int(lens.max())} (mean {lens.float().mean():.0f})")
    print("cache    ms/layer   K/V GB/s   max |diff|")
    for name in sys.argv[1:] or ["float16", "float32"]:
        dtype = getattr(torch, name)
        caches = [(torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, DIM).to(dtype), torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, DIM).to(dtype))
                  for _ in range(LAYERS)]

        def step():
            for k_cache, v_cache in caches:
                out = cpu_ops.paged_attention(query, k_cache, v_cache, blocks, lens, DIM**-0.5)
            return out

        k_cache, v_cache = caches[-1]
        out = step()
        diff = max((out[b] - reference(query[b], k_cache, v_cache, blocks[b], int(lens[b]))).abs().max().item() for b in range(SEQS))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        per_layer = best / LAYERS
        bytes_read = 2 * int(lens.sum()) * KV_HEADS * DIM * dtype.itemsize
        print(f"{name:8} {per_layer * 1000:8.3f}   {bytes_read / per_layer / 1e9:8.2f}   {diff:.1e}")


if __name__ == "__main__":
    main()
