"""Every environment variable pagedllm reads, in one place.

Imported first by the package: OMP_WAIT_POLICY must be set before torch starts
its OpenMP runtime. The PAGEDLLM_* values are read when used (module __getattr__),
so a variable set after import still counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# OpenMP threads that spin while waiting starve every other process on the cores:
# the server's HTTP process, a second engine, the test runner. Measured on the 2-core
# CI machine under load: bf16 decode 1.5 tok/s spinning vs 18 tok/s passive.
_USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def peer_environment() -> dict[str, str]:
    """The environment for another engine measured beside pagedllm (llama.cpp, vLLM, HF in `pagedllm
    bench`): the process's, with OMP_WAIT_POLICY as the user had it rather than pagedllm's default.
    (Passive OpenMP threads cost llama.cpp 2.6x at batch 1 on a 2-core VM: each of its ~500 thread
    syncs a token then wakes a sleeping thread.)"""
    env = dict(os.environ)
    if _USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = _USER_OMP_WAIT_POLICY
    return env

_VARIABLES: dict[str, Callable[[], Any]] = {
    "PAGEDLLM_LOG_LEVEL": lambda: os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO").upper(),
    "PAGEDLLM_NO_PROGRESS": lambda: os.environ.get("PAGEDLLM_NO_PROGRESS") == "1",  # no progress bars
    "PAGEDLLM_API_KEY": lambda: os.environ.get("PAGEDLLM_API_KEY"),  # the server's --api-key default
    # "0": norms, rotary and gated activations run as torch ops on CUDA too (layers/fused.py)
    "PAGEDLLM_FUSED_KERNELS": lambda: os.environ.get("PAGEDLLM_FUSED_KERNELS", "1") != "0",
    # "0": products of a few rows go through cuBLAS on CUDA too, not the Triton decode GEMV (layers/triton_linear.py)
    "PAGEDLLM_DECODE_GEMV": lambda: os.environ.get("PAGEDLLM_DECODE_GEMV", "1") != "0",
    "PAGEDLLM_TRACEBACK": lambda: os.environ.get("PAGEDLLM_TRACEBACK") == "1",  # commands: tracebacks for user errors too
    # "0": every tensor-parallel all-reduce goes through NCCL (distributed/symmetric_all_reduce.py)
    "PAGEDLLM_SYMMETRIC_ALL_REDUCE": lambda: os.environ.get("PAGEDLLM_SYMMETRIC_ALL_REDUCE", "1") != "0",
    # "0": a tensor-parallel Llama all-reduces each sublayer's output before its residual add + RMSNorm,
    # instead of one kernel for the three (layers/all_reduce_norm.py)
    "PAGEDLLM_FUSED_ALL_REDUCE_NORM": lambda: os.environ.get("PAGEDLLM_FUSED_ALL_REDUCE_NORM", "1") != "0",
    # "0": dense CPU matmuls read the plain weights (F.linear) instead of oneDNN-reordered ones (layers/cpu_packed.py)
    "PAGEDLLM_CPU_PACKED_LINEAR": lambda: os.environ.get("PAGEDLLM_CPU_PACKED_LINEAR", "1") != "0",
    # tensor-parallel workers write a torch.profiler trace of steps PAGEDLLM_PROFILE_STEPS here (executor/step_trace.py)
    "PAGEDLLM_TORCH_PROFILER_DIR": lambda: os.environ.get("PAGEDLLM_TORCH_PROFILER_DIR"),
    # tensor-parallel workers time steps PAGEDLLM_PROFILE_STEPS with CUDA events, no profiler, and write them here
    "PAGEDLLM_STEP_GAPS_DIR": lambda: os.environ.get("PAGEDLLM_STEP_GAPS_DIR"),
    "PAGEDLLM_PROFILE_STEPS": lambda: os.environ.get("PAGEDLLM_PROFILE_STEPS", "100:140"),
    # "0": quantized CPU layers use torch's int4 kernel instead of pagedllm's compiled ones (layers/cpu_kernels.py)
    "PAGEDLLM_CPU_KERNELS": lambda: os.environ.get("PAGEDLLM_CPU_KERNELS", "1") != "0",
    # the best instruction set the CPU kernels may be compiled for: avx512vnni, avxvnni or avx2 (layers/cpu_kernels.py)
    "PAGEDLLM_CPU_ISA": lambda: os.environ.get("PAGEDLLM_CPU_ISA", ""),
    # pagedllm's own cache: compiled CPU kernels, and models unless PAGEDLLM_MODEL_CACHE says otherwise
    "PAGEDLLM_CACHE_DIR": lambda: os.environ.get("PAGEDLLM_CACHE_DIR")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "pagedllm"),
    # where `pagedllm pull` puts model files (loader/catalogue.py)
    "PAGEDLLM_MODEL_CACHE": lambda: os.environ.get("PAGEDLLM_MODEL_CACHE") or os.path.join(_VARIABLES["PAGEDLLM_CACHE_DIR"](), "models"),
}


def __getattr__(name: str) -> Any:
    if name in _VARIABLES:
        return _VARIABLES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
