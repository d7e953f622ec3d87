"""pagedllm's own CPU kernels (layers/csrc/cpu_kernels.c) for x86-64 CPUs with AVX2, FMA and
F16C: integer dot products on 4- and 8-bit weight blocks, as GGUF defines them (here), and the
elementwise work and paged attention of a step, on float32 or bfloat16 activations with float32
arithmetic (layers/cpu_ops.py).

The C file is compiled at first use with the system's C compiler (under a second, no build step
at install) for the best instruction set this CPU has (ISAS: AVX2, or VNNI beside it), cached by
the hash of its source and flags in ~/.cache/pagedllm/cpu_kernels, and called through ctypes. Where it cannot run -- no compiler, another CPU, PAGEDLLM_CPU_KERNELS=0 --
`lib()` is None and callers take torch's kernels; the reason is logged once.

Weights, as contiguous tensors (N output rows, K inputs, K / 32 blocks a row), as read:
    Q4Blocks  qs (N, K/32, 16) uint8, byte j = value j | value j + 16 << 4;  dm (N, K/32, 2) fp16 [d, m]
              w = d * q + m  (GGUF Q4_1 as stored; Q4_0 is m = -8 d)
    Q8Blocks  qs (N, K) int8;  d (N, K/32) fp16                        w = d * q  (GGUF Q8_0)
and, for the products, the same bytes reordered once into Tiles (8 rows interleaved, below).
Activations are quantized to int8 in blocks of 32 inside each product (as llama.cpp does), so
the products differ from float ones by that rounding: about 0.5% of a block's largest value.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from pagedllm import envs
from pagedllm.layers import huge_pages

logger = logging.getLogger("pagedllm")

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
_CPU_FLAGS = {"avx2", "fma", "f16c"}
# The instruction sets the file is compiled for, best first: the CPU flags (/proc/cpuinfo) each
# needs beyond AVX2, and its compiler flags. VNNI's vpdpbusd does a product's multiply-adds in one
# instruction (cpu_kernels.c, "matrix products"); the results are the same bits.
ISAS = {
    "avx512vnni": ({"avx512_vnni", "avx512vl"}, ["-mavx512vnni", "-mavx512vl"]),
    "avxvnni": ({"avx_vnni"}, ["-mavxvnni"]),
    "avx2": (set(), []),
}
BLOCK = 32


@dataclass(frozen=True)
class Q4Blocks:
    qs: torch.Tensor  # (N, K / 32, 16) uint8
    dm: torch.Tensor  # (N, K / 32, 2) float16: [d, m]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * BLOCK

    @staticmethod
    def cat(parts: list[Q4Blocks]) -> Q4Blocks:
        """Rows stacked (merged q/k/v or gate/up projections)."""
        return Q4Blocks(torch.cat([p.qs for p in parts]), torch.cat([p.dm for p in parts]))

    def dequantize(self) -> torch.Tensor:
        q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()  # (N, K/32, 32) in value order
        dm = self.dm.float()
        return (q * dm[..., :1] + dm[..., 1:]).flatten(1)


@dataclass(frozen=True)
class Q8Blocks:
    qs: torch.Tensor  # (N, K) int8
    d: torch.Tensor  # (N, K / 32) float16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qs.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.qs.shape
        return (self.qs.view(n, -1, BLOCK).float() * self.d.float()[..., None]).view(n, k)


@dataclass(frozen=True)
class Tiles:
    """Q4Blocks or Q8Blocks laid out for the products (cpu_kernels.c, "matrix products"): rows in
    groups of 8 (the last zero-padded), each block's bytes of the 8 rows interleaved four at a
    time, so one vector holds four inputs' values of 8 rows. The same bytes, reordered once at
    load, into huge-page memory (layers/huge_pages.py)."""

    bits: int  # 4 or 8
    qs: torch.Tensor  # (groups, K / 32, quads, 8, 4): 4 quads of q4 bytes or 8 of q8 values
    scales: torch.Tensor  # (groups, K / 32, 2 or 1, 8) float16: q4 [d, m], q8 [d]
    rows: int

    @staticmethod
    def of(weight: Q4Blocks | Q8Blocks) -> Tiles:
        n, k = weight.shape
        if isinstance(weight, Q4Blocks):
            bits, qs, scales = 4, weight.qs, weight.dm
        else:
            bits, qs, scales = 8, weight.qs.view(n, k // BLOCK, BLOCK), weight.d[..., None]
        pad = -n % 8
        qs = torch.cat([qs, qs.new_zeros(pad, *qs.shape[1:])])
        scales = torch.cat([scales, scales.new_zeros(pad, *scales.shape[1:])])
        groups = (n + pad) // 8
        qs = huge_pages.copy(qs.view(groups, 8, k // BLOCK, -1, 4).permute(0, 2, 3, 1, 4))
        scales = huge_pages.copy(scales.view(groups, 8, k // BLOCK, -1).permute(0, 2, 3, 1))
        return Tiles(bits, qs, scales, n)

    @staticmethod
    def empty(bits: int, n: int, k: int) -> Tiles:
        """Tiles of an (n, k) matrix to be written through `row_views` (the padding rows are zeroed here)."""
        groups, pad = -(-n // 8), -n % 8
        qs = huge_pages.empty((groups, k // BLOCK, BLOCK * bits // 32, 8, 4), torch.uint8 if bits == 4 else torch.int8)
        scales = huge_pages.empty((groups, k // BLOCK, 2 if bits == 4 else 1, 8), torch.float16)
        if pad:
            qs[-1, ..., 8 - pad :, :] = 0
            scales[-1, ..., 8 - pad :] = 0
        return Tiles(bits, qs, scales, n)

    def row_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of qs (groups, 8, K / 32, quads, 4) and scales (groups, 8, K / 32, 2 or 1) by row (row 8 g + j)."""
        return self.qs.permute(0, 3, 1, 2, 4), self.scales.permute(0, 3, 1, 2)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.qs.shape[1] * BLOCK

    def blocks(self) -> Q4Blocks | Q8Blocks:
        """The row-major blocks back."""
        n, k = self.shape
        qs = self.qs.permute(0, 3, 1, 2, 4).reshape(-1, k // BLOCK, self.qs.shape[2] * 4)[:n]
        scales = self.scales.permute(0, 3, 1, 2).reshape(-1, k // BLOCK, self.scales.shape[2])[:n]
        if self.bits == 4:
            return Q4Blocks(qs.contiguous(), scales.contiguous())
        return Q8Blocks(qs.reshape(n, k).contiguous(), scales[..., 0].contiguous())

    def dequantize(self) -> torch.Tensor:
        return self.blocks().dequantize()


def matmul(x: torch.Tensor, weight: Tiles) -> torch.Tensor:
    """x (..., K) float32 @ weight (N, K)^T -> (..., N) float32. Only where lib() is not None."""
    n, k = weight.shape
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], n)
    rows = x.numel() // k
    product = lib().matmul_q4 if weight.bits == 4 else lib().matmul_q8
    if product(weight.qs.data_ptr(), weight.scales.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n, k):
        raise MemoryError(f"out of memory quantizing a ({rows}, {k}) activation")
    return y


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (the reason is logged once)."""
    return load()


def load(isa: str | None = None) -> ctypes.CDLL | None:
    """lib() without the cache: compile if needed (for `isa`, else the best this CPU and
    PAGEDLLM_CPU_ISA allow) and load, or log why not and return None. A compiler that cannot build
    an instruction set (too old for VNNI) gets the next one down."""
    reason = _unavailable()
    if reason is not None:
        logger.info("CPU kernels off (%s): quantized layers use torch's kernels", reason)
        return None
    for candidate in _isas_from(isa or best_isa(_cpu_flags(), envs.PAGEDLLM_CPU_ISA)):
        try:
            path = _compiled(ISAS[candidate][1])
            break
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or error
            logger.warning("CPU kernels: compiling %s for %s failed (%s)", _SOURCE, candidate, detail)
    else:
        logger.warning("CPU kernels off: they did not compile; quantized layers use torch's kernels")
        return None
    logger.debug("CPU kernels for %s: %s", candidate, path)
    library = ctypes.CDLL(path)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(library, name)
        fn.restype, fn.argtypes = restype, argtypes
    return library


_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# The C kernels' type codes (cpu_kernels.c, "number formats"): activations float32 or bfloat16,
# KV caches any of the three.
TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_SIGNATURES = {  # the C functions: (return type, argument types)
    "matmul_q4": (ctypes.c_int, [_P, _P, _P, _P, _I, _I, _I]),
    "matmul_q8": (ctypes.c_int, [_P, _P, _P, _P, _I, _I, _I]),
    "rms_norm": (None, [_P, _I, _P, _I, _P, _F, _P, _P, _I, _I, _T]),
    "act_and_mul": (None, [_P, _I, _P, _I, _I, _T, _T]),
    "rotary": (None, [_P, _I, _I, _I, _I, _P, _P, _T]),
    "write_kv": (None, [_P, _I, _P, _I, _P, _P, _P, _I, _I, _T, _T]),
    "paged_attention": (ctypes.c_int, [_P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _T, _T]),
    "decode_layers": (ctypes.c_int, [_P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, _P, _P, _P, _I, _P, _I, _F, _T]),
}


class DecoderLayer(ctypes.Structure):
    """decode_layers' view of one Llama decoder layer (pointers into its tensors)."""

    _fields_ = [(name, _P) for name in (
        "input_norm", "post_norm", "qkv_qs", "o_qs", "gate_up_qs", "down_qs", "qkv_dm", "o_dm", "gate_up_dm",
        "down_dm", "k_cache", "v_cache",
    )]  # fmt: skip


def _unavailable() -> str | None:
    if not envs.PAGEDLLM_CPU_KERNELS:
        return "PAGEDLLM_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"written for x86-64, this is {platform.machine()}"
    missing = _CPU_FLAGS - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if shutil.which(_compiler()) is None:
        return f"no C compiler ({_compiler()}); install gcc to use them"
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_isa(cpu_flags: set[str], cap: str = "") -> str:
    """The best of ISAS that CPU flags allow, no better than `cap` (a name in ISAS, or "": none)."""
    if cap and cap not in ISAS:
        raise ValueError(f"PAGEDLLM_CPU_ISA must be one of {', '.join(ISAS)}, not {cap!r}")
    return next(name for name in _isas_from(cap or next(iter(ISAS))) if ISAS[name][0] <= cpu_flags)


def _isas_from(name: str) -> list[str]:
    """ISAS' names from `name` down."""
    names = list(ISAS)
    return names[names.index(name) :]


def _compiler() -> str:
    return os.environ.get("CC", "gcc")


def _compiled(isa_flags: list[str]) -> str:
    """Path of the shared library, compiled now unless this source and these flags already were."""
    flags = [*_FLAGS, *isa_flags]
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([_compiler(), *flags]).encode()).hexdigest()[:16]
    folder = os.path.join(os.path.expanduser(envs.PAGEDLLM_CACHE_DIR), "cpu_kernels", key)
    path = os.path.join(folder, "libpagedllm_cpu.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    # Written under another name and renamed: processes compiling at once each see a whole file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([_compiler(), *flags, "-o", partial, _SOURCE], check=True, capture_output=True, text=True)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    logger.info("CPU kernels compiled in %.1f s (%s)", time.perf_counter() - start, path)
    return path
