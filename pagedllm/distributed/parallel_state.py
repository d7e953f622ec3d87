"""Tensor-parallel groups: who this process is (rank of world_size) and the collectives the
parallel layers call, on torch.distributed (NCCL on CUDA, gloo on CPU).

Ranks meet through a TCPStore that the driver hosts on 127.0.0.1 with port 0: the OS picks a
free port and the store keeps it bound, so no other process can take it between choosing and
binding. Each rank joins the store as a client (`init_tensor_parallel`).

A model learns its group while it is built:

    with building_for(tp):
        model = model_class(hf_config)   # each parallel layer calls get_tp_group() once

Layers keep the group they were built with; nothing reads module state in a forward. Outside
such a block the group is the single rank, so N = 1 builds the plain model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedllm.config import shard_range  # noqa: F401  (re-exported: the layers split by it)
from pagedllm.distributed.symmetric_all_reduce import SymmetricAllReduce

logger = logging.getLogger("pagedllm")

# How long a rank waits for the others at the rendezvous (a slow rank may still be loading torch).
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)

# torch renamed all_gather_into_tensor; the new name where it exists.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None  # None for a single rank: every collective is a no-op
    small_all_reduce: SymmetricAllReduce | None = None  # CUDA: small tensors skip NCCL

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks: in place, or a new tensor (use the result; x must be contiguous)."""
        if self.world_size == 1:
            return x
        if self.small_all_reduce is not None and self.small_all_reduce.fits(x):
            return self.small_all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                half: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x summed over ranks, plus the residual, RMS-normed: (normed, new residual) from one
        kernel, or None where that kernel does not run (no symmetric memory, x too large):
        then all_reduce and norm as usual. half: see SymmetricAllReduce.add_rms_norm."""
        if self.small_all_reduce is None:
            return None
        return self.small_all_reduce.add_rms_norm(x, residual, weight, eps, half)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(T, n) on each rank -> (T, world_size * n): rank r's columns at [r * n, (r + 1) * n)."""
        if self.world_size == 1:
            return x
        T, n = x.shape
        out = torch.empty(self.world_size * T, n, dtype=x.dtype, device=x.device)  # ranks stacked on rows
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.world_size, T, n).transpose(0, 1).reshape(T, self.world_size * n)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank src's values on every rank, in place."""
        if self.world_size > 1:
            dist.broadcast(x, src, group=self.group)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's value."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE_RANK = TensorParallelGroup()


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_tensor_parallel(rank: int, world_size: int, store_host: str, store_port: int, device: str) -> TensorParallelGroup:
    """Join the driver's store and form the process group (this process's only one)."""
    store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    options = {"device_id": torch.device(device)} if device.startswith("cuda") else {}
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, **options)
    group = dist.group.WORLD
    small = SymmetricAllReduce.create(group) if device.startswith("cuda") else None
    return TensorParallelGroup(rank, world_size, group, small)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


# -- the group of the model being built -------------------------------------------------------

_building: TensorParallelGroup | None = None


@contextlib.contextmanager
def building_for(tp: TensorParallelGroup) -> Iterator[None]:
    """Parallel layers constructed inside take `tp` as their group. Not nestable."""
    global _building
    if _building is not None:
        raise RuntimeError("building_for() blocks do not nest: a model is already being built")
    _building = tp
    try:
        yield
    finally:
        _building = None


def get_tp_group() -> TensorParallelGroup:
    """The group of the model under construction (the single rank outside building_for)."""
    return _building if _building is not None else SINGLE_RANK
