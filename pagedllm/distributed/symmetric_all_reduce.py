"""Small all-reduces through symmetric memory: each rank copies its partial sum into a buffer that
every other rank can read over NVLink, and sums its peers' copies itself (torch's one-shot
all-reduce, `torch.ops.symm_mem.one_shot_all_reduce_copy`; peer-to-peer loads, no NVLink multicast).

Why: a decode step of a tensor-parallel Llama all-reduces a few KB twice per layer, where NCCL's
latency, not bandwidth, is the cost. Measured on 2x H200 inside a CUDA graph
(scripts/gpu_allreduce_bench.py): 8 KB 12.0 µs NCCL vs 6.5 µs here, 512 KB 15.9 vs 10.1,
2 MB 33.5 vs 19.0. Larger tensors (prefill chunks) stay on NCCL.

The buffer of a dtype is allocated and exchanged (a collective) at its first all-reduce, which is
the memory-profiling forward pass, run eagerly on every rank in the same order; an all-reduce
that would need a new buffer while a CUDA graph is being captured goes to NCCL instead (every
rank captures the same graph, so they agree).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pagedllm import envs

logger = logging.getLogger("pagedllm")

MAX_BYTES = 2 << 20  # 256 tokens of a 4096-wide bf16 hidden state


class SymmetricAllReduce:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group_name = group.group_name
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def create(cls, group: dist.ProcessGroup) -> SymmetricAllReduce | None:
        """One for a CUDA group whose GPUs reach each other, unless PAGEDLLM_SYMMETRIC_ALL_REDUCE=0."""
        if not envs.PAGEDLLM_SYMMETRIC_ALL_REDUCE or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            return None
        here = torch.cuda.current_device()
        if not all(torch.cuda.can_device_access_peer(here, d) for d in range(torch.cuda.device_count()) if d != here):
            logger.info("all-reduce: NCCL only (the GPUs cannot read each other's memory)")
            return None
        return cls(group)

    def fits(self, x: torch.Tensor) -> bool:
        if x.numel() * x.element_size() > MAX_BYTES or not x.is_contiguous():
            return False
        return x.dtype in self.buffers or not torch.cuda.is_current_stream_capturing()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(x.dtype)
        if buffer is None:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(MAX_BYTES // x.element_size(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buffer, self.group_name)
            self.buffers[x.dtype] = buffer
        # The op sums the whole buffer it is given: the leading part of ours, shaped like x.
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buffer[: x.numel()].view_as(x), x, "sum", self.group_name)
