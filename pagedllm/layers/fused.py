"""Whether a layer's forward takes the fused Triton kernels (layers/triton_ops.py).

They run when the tensor is on CUDA, Triton imports and PAGEDLLM_FUSED_KERNELS is not
"0" (the switch is for A/B measurements and for bisecting a numerical difference). The
decision about Triton and the variable is taken once per process: a layer asks on every
forward, and an environment lookup per call would cost more host time than the kernel
launch saves on small models. CPU tensors always take the torch code.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pagedllm import envs


def triton_ops_for(x: torch.Tensor) -> ModuleType | None:
    """pagedllm.layers.triton_ops if x should go through it, else None."""
    return _triton_ops() if x.is_cuda else None


@functools.cache
def _triton_ops() -> ModuleType | None:
    if not envs.PAGEDLLM_FUSED_KERNELS:
        return None
    try:
        from pagedllm.layers import triton_ops
    except ImportError:  # a CUDA torch without Triton: the torch code runs
        return None
    return triton_ops


def reset() -> None:
    """Read PAGEDLLM_FUSED_KERNELS again (benchmarks that compare both paths in one process)."""
    _triton_ops.cache_clear()
