"""Prefill attention on the CPU: every prompt token as one row of pagedllm's paged kernel
(what the torch backend runs where the CPU kernels do) against torch's SDPA over the gathered,
causal context (what it ran before). SmolLM2's heads (9 query, 3 kv, dim 64), one prompt of
each length, float32 and float16 caches: ms per layer call, best of 5, this process's threads.

    PYTHONPATH=. .venv/bin/python scripts/cpu_prefill_attention_bench.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpu_linear_bench import _ms  # (this folder is on the path when a script runs)

from pagedllm.layers import cpu_ops
from pagedllm.layers.cpu_kernels import lib

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
LENGTHS = (32, 136, 256, 512, 1024)


def main() -> None:
    if lib() is None:
        raise SystemExit("pagedllm's CPU kernels do not run here")
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}")
    print("cache    tokens  kernel ms  SDPA ms  max |diff|")
    for dtype in (torch.float32, torch.float16):
        for length in LENGTHS:
            blocks = (length + BLOCK - 1) // BLOCK
            k_cache = torch.randn(blocks + 4, BLOCK, KV_HEADS, DIM).to(dtype)
            v_cache = torch.randn(blocks + 4, BLOCK, KV_HEADS, DIM).to(dtype)
            table = torch.randperm(blocks + 4)[:blocks].int()
            query = torch.randn(length, HEADS, DIM)
            lens, starts = torch.tensor([length], dtype=torch.int32), torch.tensor([0, length], dtype=torch.int32)

            def kernel():
                return cpu_ops.paged_attention(query, k_cache, v_cache, table[None], lens, DIM**-0.5, None, starts)

            def sdpa():
                k = k_cache[table.long()].flatten(0, 1)[:length].transpose(0, 1).float()
                v = v_cache[table.long()].flatten(0, 1)[:length].transpose(0, 1).float()
                q = query.transpose(0, 1)
                o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=DIM**-0.5, enable_gqa=True)
                return o[0].transpose(0, 1)

            diff = (kernel() - sdpa()).abs().max().item()
            name = str(dtype).removeprefix("torch.")
            print(f"{name:8} {length:6}  {_ms(kernel):9.3f}  {_ms(sdpa):7.3f}  {diff:.1e}")


if __name__ == "__main__":
    main()
