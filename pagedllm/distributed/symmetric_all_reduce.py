"""Small all-reduces through symmetric memory: each rank copies its partial sum into a buffer that
every other rank can read over NVLink, and sums its peers' copies itself (torch's one-shot
all-reduce, `torch.ops.symm_mem.one_shot_all_reduce_copy`; peer-to-peer loads, no NVLink multicast).

Why: a decode step of a tensor-parallel Llama all-reduces a few KB twice per layer, where NCCL's
latency, not bandwidth, is the cost. Measured on 2x H200 inside a CUDA graph
(scripts/gpu_allreduce_bench.py): 8 KB 12.0 µs NCCL vs 6.5 µs here, 512 KB 15.9 vs 10.1,
2 MB 33.5 vs 19.0. Larger tensors (prefill chunks) stay on NCCL.

`add_rms_norm` is the same all-reduce fused with the residual add and RMSNorm that follow it
(triton_all_reduce_norm.py): its own allocation, two halves of MAX_BYTES (the caller alternates
them, which is what lets that kernel wait at one barrier instead of two), and its signal pads.

The buffer of a dtype is allocated and exchanged (a collective) at its first all-reduce, which is
the memory-profiling forward pass, run eagerly on every rank in the same order; an all-reduce
that would need a new buffer while a CUDA graph is being captured goes to NCCL instead (every
rank captures the same graph, so they agree).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedllm import envs

logger = logging.getLogger("pagedllm")

MAX_BYTES = 2 << 20  # 256 tokens of a 4096-wide bf16 hidden state
# Programs of the fused kernel: each barriers with its twin on every peer, so all of them must be
# resident at once (well under an H100's 132 SMs); more rows than this share programs.
MAX_PROGRAMS = 64


@dataclass(frozen=True)
class _NormBuffers:
    """The fused kernel's symmetric memory for one dtype: every rank's buffer, by half."""

    allocation: torch.Tensor  # keeps the memory alive
    halves: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # [half][rank], MAX_BYTES each
    pads: tuple[torch.Tensor, ...]  # every rank's signal pad, int32
    rank: int
    num_programs: int


class SymmetricAllReduce:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group_name = group.group_name
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.norm_buffers: dict[torch.dtype, _NormBuffers] = {}

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

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     half: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(norm(sum_ranks(x) + residual) * weight, sum_ranks(x) + residual) in one kernel, or
        None where it does not run here (too large, not (tokens, hidden) rows, or the buffers
        would be made during a graph capture): then sum x another way. half: 0 or 1, alternating
        between consecutive calls (the caller's contract, triton_all_reduce_norm.py)."""
        if (x.dim() != 2 or x.numel() * x.element_size() > MAX_BYTES or not x.is_contiguous() or residual is None
                or residual.shape != x.shape or not residual.is_contiguous()):  # fmt: skip
            return None
        buffers = self.norm_buffers.get(x.dtype)
        if buffers is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            buffers = self.norm_buffers[x.dtype] = self._norm_buffers(x.dtype, x.device)
        from pagedllm.distributed.triton_all_reduce_norm import all_reduce_add_rms_norm

        return all_reduce_add_rms_norm(x, residual, weight, eps, buffers.halves[half], buffers.pads, buffers.rank,
                                       buffers.num_programs)

    def _norm_buffers(self, dtype: torch.dtype, device: torch.device) -> _NormBuffers:
        import torch.distributed._symmetric_memory as symm_mem

        numel = MAX_BYTES // dtype.itemsize
        allocation = symm_mem.empty(2 * numel, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(allocation, self.group_name)
        ranks = range(handle.world_size)
        halves = tuple(tuple(handle.get_buffer(r, (numel,), dtype, h * numel) for r in ranks) for h in (0, 1))
        pads = tuple(handle.get_signal_pad(r, dtype=torch.int32) for r in ranks)
        num_programs = min(MAX_PROGRAMS, pads[0].numel() // handle.world_size)
        return _NormBuffers(allocation, halves, pads, handle.rank, num_programs)
