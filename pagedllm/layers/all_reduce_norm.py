"""A row-parallel layer's all-reduce left to the RMSNorm after it, which does it together with
its residual add in one kernel on GPUs with symmetric memory (distributed/triton_all_reduce_norm.py).

    unfused:  o_proj -> all-reduce -> [add residual + RMSNorm]      two kernels a boundary
    fused:    o_proj (partial sum) -> [all-reduce + add + RMSNorm]  one kernel

A model links each (RowParallelLinear, RMSNorm) pair in data-flow order once its layers are
final (quantization swaps some linears for twins that reduce themselves, so it is done at the
first forward, not at construction). Where the kernel cannot run (CPU/gloo, no peer access, a
tensor larger than the first call's, which sized the buffers) the norm all-reduces first and the
numbers are the unfused path's. PAGEDLLM_FUSED_ALL_REDUCE_NORM=0 links nothing: the unfused path exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from pagedllm import envs
from pagedllm.distributed import TensorParallelGroup
from pagedllm.layers.linear import RowParallelLinear
from pagedllm.layers.norm import RMSNorm


@dataclass(frozen=True)
class DeferredAllReduce:
    """What a norm needs to sum its input over the ranks itself."""

    tp: TensorParallelGroup
    half: int  # the fused kernel's buffer half: alternates along the data flow


def defer_all_reduces(boundaries: Sequence[tuple[nn.Module, nn.Module]]) -> bool:
    """Link every (linear, norm) pair, in the order a forward meets them, or none: each must be a
    bias-free RowParallelLinear over several ranks followed by a plain RMSNorm that gets a
    residual. All or none keeps the halves alternating between consecutive fused calls, also
    from one forward to the next (an even count). Whether they were linked."""
    eligible = envs.PAGEDLLM_FUSED_ALL_REDUCE_NORM and len(boundaries) % 2 == 0 and all(
        type(linear) is RowParallelLinear and linear.bias is None and linear.tp.world_size > 1 and type(norm) is RMSNorm
        for linear, norm in boundaries
    )
    if not eligible:
        return False
    for i, (linear, norm) in enumerate(boundaries):
        linear.reduce_results = False
        norm.deferred_all_reduce = DeferredAllReduce(linear.tp, i % 2)
    return True
