"""Small all-reduces through symmetric memory: each rank copies its partial sum into a buffer that
every other rank can read over NVLink, and sums its peers' copies itself (torch's one-shot
all-reduce, `torch.ops.symm_mem.one_shot_all_reduce_copy`; peer-to-peer loads, no NVLink multicast).

Why: a decode step of a tensor-parallel Llama all-reduces a few KB twice per layer, where NCCL's
latency, not bandwidth, is the cost. Measured on 2x H200 inside a CUDA graph
(scripts/gpu_allreduce_bench.py): 8 KB 12.0 µs NCCL vs 6.5 µs here, 512 KB 15.9 vs 10.1,
2 MB 33.5 vs 19.0. Larger tensors (prefill chunks) stay on NCCL.

`add_rms_norm` is the same all-reduce fused with the residual add and RMSNorm that follow it
(triton_all_reduce_norm.py), for prefill chunks too: every peer pushes its partial sum into
this rank's inbox, of which each rank has two (the caller alternates them, which is what lets a
rank reuse one without waiting for its peers), each with a slot per peer as large as the first
call's tensor (at least MAX_BYTES, at most MAX_SLOT_BYTES and MAX_INBOX_BYTES in all; a larger
tensor takes NCCL).

A buffer of a dtype is allocated and exchanged (a collective) at its first call, which is the
memory-profiling forward pass of the largest batch, run eagerly on every rank in the same order
(so the KV cache is sized around it); a call that would need a new buffer while a CUDA graph is
being captured goes to NCCL instead (every rank captures the same graph, so they agree).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedllm import envs

logger = logging.getLogger("pagedllm")

MAX_BYTES = 2 << 20  # 256 tokens of a 4096-wide bf16 hidden state
# The fused kernel's inboxes, a slot per peer and half: at most 64 MiB a slot (8192 tokens of that
# hidden state) and 256 MiB in all a GPU (TP=2: 128 MiB; TP=8: 18 MiB slots, 2304 such tokens).
MAX_SLOT_BYTES = 64 << 20
MAX_INBOX_BYTES = 256 << 20
# Programs of the fused kernel: each waits for rows that its twin on every peer pushes, so all of
# them must be resident at once. A decode batch takes 64 (well under an H100's 132 SMs); a prefill
# chunk one per SM (the kernel takes a whole SM's threads, so one fits on each).
MAX_PROGRAMS = 64


@dataclass(frozen=True)
class _Inboxes:
    """The fused kernel's symmetric memory for one dtype. Each rank's allocation holds two
    inboxes (halves), each a slot per peer: [half][peer][element], peers in rank order."""

    allocation: torch.Tensor  # keeps the memory alive
    sends: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # [half][peer]: this rank's slot in its inbox
    inbox: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # [half][sender]: the sender's slot here
    rank: int
    slot_numel: int
    num_sms: int


class SymmetricAllReduce:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group_name = group.group_name
        self.world_size = group.size()
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.inboxes: dict[torch.dtype, _Inboxes] = {}

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
        if (x.dim() != 2 or not x.is_contiguous() or residual is None or residual.shape != x.shape
                or not residual.is_contiguous()):  # fmt: skip
            return None
        inboxes = self.inboxes.get(x.dtype)
        if inboxes is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            inboxes = self.inboxes[x.dtype] = self._inboxes(x.dtype, x.device, x.numel())
        if x.numel() > inboxes.slot_numel:
            return None
        from pagedllm.distributed.triton_all_reduce_norm import LARGE, all_reduce_add_rms_norm

        programs = MAX_PROGRAMS if x.shape[0] <= LARGE else inboxes.num_sms
        return all_reduce_add_rms_norm(x, residual, weight, eps, inboxes.sends[half], inboxes.inbox[half], inboxes.rank,
                                       programs)

    def _inboxes(self, dtype: torch.dtype, device: torch.device, numel: int) -> _Inboxes:
        import torch.distributed._symmetric_memory as symm_mem

        from pagedllm.distributed.triton_all_reduce_norm import mark_empty

        peers = self.world_size - 1
        most = min(MAX_SLOT_BYTES, MAX_INBOX_BYTES // (2 * peers)) // dtype.itemsize
        numel = min(max(numel, MAX_BYTES // dtype.itemsize), most)  # the same on every rank
        allocation = symm_mem.empty(2 * peers * numel, dtype=dtype, device=device)
        mark_empty(allocation)
        torch.cuda.synchronize()  # empty before any peer can write into it (after the rendezvous)
        handle = symm_mem.rendezvous(allocation, self.group_name)
        rank, ranks = handle.rank, range(self.world_size)

        def slot(owner: int, half: int, sender: int) -> torch.Tensor:
            if owner == sender:  # no slot: the kernel never touches it
                return allocation[:1]
            peer_index = sender if sender < owner else sender - 1
            return handle.get_buffer(owner, (numel,), dtype, (half * peers + peer_index) * numel)

        sends = tuple(tuple(slot(peer, h, rank) for peer in ranks) for h in (0, 1))
        inbox = tuple(tuple(slot(rank, h, sender) for sender in ranks) for h in (0, 1))
        logger.debug("fused all-reduce + norm: inboxes of %d MiB (%s)", allocation.nbytes >> 20, dtype)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return _Inboxes(allocation, sends, inbox, rank, numel, num_sms)
