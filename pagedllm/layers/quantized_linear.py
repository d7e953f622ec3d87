"""Linear layers that compute on quantized weights on the CPU.

Every quantized matrix is held in GGUF's blocks of 32 values along the input dim
(layers/cpu_kernels.py: Q4Blocks, w = d * q + m with q in [0, 15]; Q8Blocks, w = d * q), and
GGUF's own blocks map onto them exactly:

    Q4_0  [fp16 d | 16 bytes]          w = d * (q - 8)   ->  d, m = -8 d
    Q4_1  [fp16 d | fp16 m | 16 bytes] w = d * q + m     ->  d, m
    Q8_0  [fp16 d | 32 int8]           w = d * q         ->  d
    byte j of a Q4 block holds value j in its low nibble and value j + 16 in its high nibble

so a GGUF model's Q4 and Q8_0 matrices compute as stored, never dequantized; float checkpoints
are quantized at load (`--quantization int4|int8`, round to nearest per block).

Two kernels:
    BlockLinear  pagedllm's (layers/csrc/cpu_kernels.c, x86-64 with AVX2): the activations are
                 quantized to int8 blocks and each block's dot product is an integer one, as in
                 llama.cpp; float32 in and out.
    Int4Linear / Int8Linear  torch's, where pagedllm's cannot run (no C compiler, another CPU,
                 PAGEDLLM_CPU_KERNELS=0): aten._weight_int4pack_mm_for_cpu (int4 groups of 32
                 with a scale and zero point each) and aten._weight_int8pack_mm (one scale per
                 row). The x86 ones are vectorized (AVX2, AVX-512) for bfloat16 activations only
                 -- with float32 torch takes a scalar loop, slower than the dense matmul -- so
                 activations are cast to bfloat16 around them, the scales are held in bfloat16
                 (fp16 scales lose 3 mantissa bits), and a CPU without AVX2 keeps layers dense.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm.distributed import TensorParallelGroup
from pagedllm.layers import cpu_kernels
from pagedllm.layers.cpu_kernels import BLOCK, Q4Blocks, Q8Blocks

logger = logging.getLogger("pagedllm")

QUANTIZATIONS = ("gguf", "int4", "int8")
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}


def kernel_dtype(capability: str | None = None) -> torch.dtype | None:
    """Activation dtype the quantized layers compute in on this CPU (None: no fast kernel, stay
    dense). float32 with pagedllm's kernels; else bfloat16 for torch's, which are vectorized on
    x86 with AVX2 and AVX-512 only. capability: torch.backends.cpu.get_cpu_capability()."""
    if capability is None:
        if cpu_kernels.lib() is not None:
            return torch.float32
        capability = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if capability.startswith(("AVX2", "AVX512")) else None


def blocks_from_gguf(blocks: torch.Tensor, ggml_type: int) -> Q4Blocks | Q8Blocks:
    """blocks: (N, K / 32, block bytes) uint8 of a Q4_0, Q4_1 or Q8_0 tensor -> the same values."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)  # (N, K / 32, 1)
    if ggml_type == GGML_Q8_0:
        return Q8Blocks(blocks[..., 2:].contiguous().view(torch.int8).flatten(1), d.squeeze(-1))
    if ggml_type == GGML_Q4_1:
        return Q4Blocks(blocks[..., 4:].contiguous(), blocks[..., 0:4].contiguous().view(torch.float16))
    return Q4Blocks(blocks[..., 2:].contiguous(), torch.cat([d, d * -8], dim=-1))  # exact: a power of two


def q4_from_float(weight: torch.Tensor) -> Q4Blocks:
    """Asymmetric round-to-nearest per block of 32 (the block's min and max map to 0 and 15)."""
    groups = weight.float().view(weight.shape[0], -1, BLOCK)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = ((hi - lo) / 15).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    m = lo.half().float()
    q = ((groups - m[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Q4Blocks(q[..., :16] | (q[..., 16:] << 4), torch.stack([d, m], dim=-1).half())


def q8_from_float(weight: torch.Tensor) -> Q8Blocks:
    """Symmetric round-to-nearest per block of 32."""
    groups = weight.float().view(weight.shape[0], -1, BLOCK)
    d = (groups.abs().amax(-1) / 127).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    q = (groups / d[..., None]).round().clamp(-127, 127).to(torch.int8)
    return Q8Blocks(q.flatten(1), d.half())


class _QuantizedLinear(nn.Module):
    """y = x W^T + b on a quantized W; with tensor parallelism a row-parallel layer sums its
    partial products over the ranks before the bias, as RowParallelLinear does."""

    format: str

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 tp: TensorParallelGroup | None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = compute_dtype
        self.tp = tp  # set for a row-parallel layer over several ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x)
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> x W^T (..., N), in x's dtype."""
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]).to(self.compute_dtype)).to(x.dtype)
        return y.view(*shape[:-1], y.shape[-1])


class BlockLinear(_QuantizedLinear):
    """Q4 or Q8 blocks through pagedllm's kernels (cpu_kernels.lib() must be there)."""

    def __init__(self, weight: Q4Blocks | Q8Blocks | cpu_kernels.Tiles, bias=None, tp=None) -> None:
        """weight: blocks, reordered here for the kernels, or tiles written already (loader/quantize.py)."""
        super().__init__(*weight.shape, bias, torch.float32, tp)
        tiles = weight if isinstance(weight, cpu_kernels.Tiles) else cpu_kernels.Tiles.of(weight)
        self.format = "int4" if tiles.bits == 4 else "int8"
        self.weight_tiles = tiles

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.matmul(x.float(), self.weight_tiles).to(x.dtype)  # (no-ops in float32)

    def dequantize(self) -> torch.Tensor:
        return self.weight_tiles.dequantize()


class Int4Linear(_QuantizedLinear):
    """Q4 blocks through torch's int4 kernel: w = (q - 8) * scale + zero, so zero = m + 8 d."""

    format = "int4"

    def __init__(self, weight: Q4Blocks, bias=None, compute_dtype=torch.bfloat16, tp=None) -> None:
        super().__init__(*weight.shape, bias, compute_dtype, tp)
        q = torch.cat([weight.qs & 0x0F, weight.qs >> 4], dim=-1).flatten(1).int()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        d, m = weight.dm.float().unbind(-1)
        # (K / 32, N, 2): [scale, zero] of every group, as the kernel reads them.
        scales_zeros = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(compute_dtype).contiguous()
        self.register_buffer("scales_zeros", scales_zeros)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, BLOCK, self.scales_zeros)


class Int8Linear(_QuantizedLinear):
    format = "int8"

    def __init__(self, weight: torch.Tensor, bias=None, compute_dtype=torch.bfloat16, tp=None) -> None:
        """weight: the float (N, K) matrix, quantized here symmetrically per output row."""
        super().__init__(*weight.shape, bias, compute_dtype, tp)
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("q", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(compute_dtype))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]


def quantized_from(layer: nn.Linear, weight: Q4Blocks | cpu_kernels.Tiles | None, fmt: str, compute_dtype: torch.dtype) -> _QuantizedLinear:
    """The quantized twin of a (Column|Row)ParallelLinear or plain nn.Linear: int4 from `weight`
    (GGUF's own blocks; tiles only for pagedllm's kernels) or, without one, from the layer's float
    weight; on pagedllm's kernels when compute_dtype is float32, else on torch's."""
    tp = getattr(layer, "tp", None)
    reduce = tp if tp is not None and tp.world_size > 1 and hasattr(layer, "input_slice") else None
    bias = None if layer.bias is None else layer.bias.data
    if compute_dtype == torch.float32:
        if fmt == "int8":
            blocks = q8_from_float(layer.weight.data)
        else:
            blocks = weight if weight is not None else q4_from_float(layer.weight.data)
        return BlockLinear(blocks, bias, reduce)
    if fmt == "int8":
        return Int8Linear(layer.weight.data, bias, compute_dtype, reduce)
    return Int4Linear(weight if weight is not None else q4_from_float(layer.weight.data), bias, compute_dtype, reduce)

