"""Whether a layer's forward takes fused kernels: the Triton ones on CUDA (layers/triton_ops.py),
pagedllm's compiled ones on the CPU in float32 and bfloat16 (layers/cpu_ops.py); both modules offer
the same functions (rms_norm, rotary_inplace_, silu_and_mul, gelu_tanh_and_mul). On CUDA the
few-row products of the large matrices take the Triton decode GEMV (layers/triton_linear.py) on
Hopper GPUs, unless PAGEDLLM_DECODE_GEMV is "0" as well.

They run unless PAGEDLLM_FUSED_KERNELS is "0" (the switch is for A/B measurements and for
bisecting a numerical difference) and where their compiler is there (Triton imports; the C
compiler worked, layers/cpu_kernels.py). The decision is taken once per process: a layer asks
on every forward, and an environment lookup per call would cost more host time than the kernel
saves on small models. Other tensors (CPU float16) take the torch code.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pagedllm import envs
from pagedllm.layers.cpu_ops import ACTIVATION_DTYPES


def fused_ops_for(x: torch.Tensor) -> ModuleType | None:
    """pagedllm.layers.triton_ops or .cpu_ops if x should go through it, else None."""
    return _triton_ops() if x.is_cuda else cpu_ops_for(x)


def decode_gemv_for(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """pagedllm.layers.triton_linear if x @ weight^T should take its decode GEMV, else None."""
    if not x.is_cuda:
        return None
    gemv = _triton_linear()
    return gemv if gemv is not None and gemv.takes(x, weight) else None


def cpu_ops_for(x: torch.Tensor) -> ModuleType | None:
    """pagedllm.layers.cpu_ops if x is a float32 or bfloat16 CPU tensor and the kernels run here, else None."""
    return _cpu_ops() if x.dtype in ACTIVATION_DTYPES and x.device.type == "cpu" else None


@functools.cache
def _triton_ops() -> ModuleType | None:
    if not envs.PAGEDLLM_FUSED_KERNELS:
        return None
    try:
        from pagedllm.layers import triton_ops
    except ImportError:  # a CUDA torch without Triton: the torch code runs
        return None
    return triton_ops


@functools.cache
def _triton_linear() -> ModuleType | None:
    # Hopper only: its launch shapes were fitted on an H200, and they need 144 KB of shared memory
    if _triton_ops() is None or not envs.PAGEDLLM_DECODE_GEMV or torch.cuda.get_device_capability()[0] != 9:
        return None
    from pagedllm.layers import triton_linear

    return triton_linear


@functools.cache
def _cpu_ops() -> ModuleType | None:
    from pagedllm.layers import cpu_kernels, cpu_ops

    return cpu_ops if envs.PAGEDLLM_FUSED_KERNELS and cpu_kernels.lib() is not None else None


def reset() -> None:
    """Read PAGEDLLM_FUSED_KERNELS again (benchmarks that compare both paths in one process)."""
    _triton_ops.cache_clear()
    _triton_linear.cache_clear()
    _cpu_ops.cache_clear()
