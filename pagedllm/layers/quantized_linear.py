"""Linear layers that compute on quantized weights, with torch's own CPU kernels.

    int4: aten._weight_int4pack_mm_for_cpu -- 4-bit values q in [0, 15] in groups of 32 along the
          input dim, each group with a scale and a zero point:   w = (q - 8) * scale + zero
    int8: aten._weight_int8pack_mm         -- int8 values, one scale per output row: w = q * scale

GGUF's Q4_0 and Q4_1 blocks are exactly that int4 format (32 values a block):

    Q4_0  [fp16 d | 16 bytes]          w = d * (q - 8)   ->  scale d, zero 0
    Q4_1  [fp16 d | fp16 m | 16 bytes] w = d * q + m     ->  scale d, zero m + 8 d
    byte j of a block holds value j in its low nibble and value j + 16 in its high nibble

so a GGUF model's Q4 matrices are packed as they are, never dequantized (`int4_from_gguf`). Float
checkpoints are quantized at load (`--quantization int4|int8`).

Kernel choice (`kernel_dtype`): the x86 kernels are vectorized (AVX2 and AVX-512) for bfloat16
activations only; with float32 activations torch falls back to a scalar loop, slower than the dense
float32 matmul it replaces. So activations are cast to bfloat16 around the kernel, and on a CPU
without AVX2 the layers stay dense. The scales are held in bfloat16 too (the kernel takes them in
the activation dtype): GGUF's fp16 scales lose 3 mantissa bits, a relative 2^-9 at most.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import TensorParallelGroup

logger = logging.getLogger("pagedllm")

GROUP_SIZE = 32  # values per int4 group: GGUF's block, and the smallest group the kernel takes
QUANTIZATIONS = ("gguf", "int4", "int8")
GGML_Q4_0, GGML_Q4_1 = 2, 3
_Q4_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20}


def kernel_dtype(capability: str | None = None) -> torch.dtype | None:
    """Activation dtype the quantized kernels run fast in on this CPU (None: no fast kernel, stay
    dense). capability: torch.backends.cpu.get_cpu_capability() (DEFAULT, AVX2, AVX512, ...)."""
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if capability.startswith(("AVX2", "AVX512")) else None


@dataclass(frozen=True)
class Int4Weight:
    """An (N, K) matrix as int4 groups: w[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g], g = k // 32."""

    q: torch.Tensor  # (N, K) int32 in [0, 15]
    scales: torch.Tensor  # (N, K / 32) float32
    zeros: torch.Tensor  # (N, K / 32) float32

    def dequantize(self) -> torch.Tensor:
        groups = self.q.view(self.q.shape[0], -1, GROUP_SIZE).float() - 8
        return (groups * self.scales[..., None] + self.zeros[..., None]).flatten(1)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Rows stacked (merged q/k/v or gate/up projections)."""
        return Int4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "zeros")))


def int4_from_gguf(blocks: torch.Tensor, ggml_type: int) -> Int4Weight:
    """blocks: (N, K / 32, block bytes) uint8 of a Q4_0 or Q4_1 tensor -> the same values as int4 groups."""
    data = blocks[..., 4:] if ggml_type == GGML_Q4_1 else blocks[..., 2:]  # (N, G, 16) nibbles
    q = torch.cat([data & 0x0F, data >> 4], dim=-1).flatten(1).int()  # values j and j + 16 of each block
    scale = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if ggml_type == GGML_Q4_1:
        zero = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() + 8 * scale
    else:
        zero = torch.zeros_like(scale)
    return Int4Weight(q, scale, zero)


def int4_from_float(weight: torch.Tensor) -> Int4Weight:
    """Asymmetric round-to-nearest per group of 32 (min and max of the group map to 0 and 15)."""
    groups = weight.float().view(weight.shape[0], -1, GROUP_SIZE)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    return Int4Weight(q.flatten(1).int(), scale, lo + 8 * scale)


class _QuantizedLinear(nn.Module):
    """y = x W^T + b on a quantized W; with tensor parallelism a row-parallel layer sums its
    partial products over the ranks before the bias, as RowParallelLinear does."""

    def __init__(self, bias: torch.Tensor | None, compute_dtype: torch.dtype, tp: TensorParallelGroup | None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = compute_dtype
        self.tp = tp  # set for a row-parallel layer over several ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]).to(self.compute_dtype)).to(x.dtype)
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], y.shape[-1])


class Int4Linear(_QuantizedLinear):
    format = "int4"

    def __init__(self, weight: Int4Weight, bias=None, compute_dtype=torch.bfloat16, tp=None) -> None:
        super().__init__(bias, compute_dtype, tp)
        self.out_features, self.in_features = weight.q.shape
        if self.in_features % GROUP_SIZE:
            raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZE}, got {self.in_features}")
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.contiguous(), 1))
        # (K / 32, N, 2): [scale, zero] of every group, as the kernel reads them.
        scales_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1).to(compute_dtype).contiguous()
        self.register_buffer("scales_zeros", scales_zeros)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)


class Int8Linear(_QuantizedLinear):
    format = "int8"

    def __init__(self, weight: torch.Tensor, bias=None, compute_dtype=torch.bfloat16, tp=None) -> None:
        """weight: the float (N, K) matrix, quantized here symmetrically per output row."""
        super().__init__(bias, compute_dtype, tp)
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("q", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(compute_dtype))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]


def quantized_from(layer: nn.Linear, weight: Int4Weight | None, fmt: str, compute_dtype: torch.dtype) -> _QuantizedLinear:
    """The quantized twin of a (Column|Row)ParallelLinear or plain nn.Linear: int4 from `weight`
    (GGUF's own blocks) or, without one, from the layer's float weight."""
    tp = getattr(layer, "tp", None)
    reduce = tp if tp is not None and tp.world_size > 1 and hasattr(layer, "input_slice") else None
    bias = None if layer.bias is None else layer.bias.data
    if fmt == "int8":
        return Int8Linear(layer.weight.data, bias, compute_dtype, reduce)
    return Int4Linear(weight if weight is not None else int4_from_float(layer.weight.data), bias, compute_dtype, reduce)


def float_linear_error(layer: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    """Largest |quantized layer(x) - x W_ref^T| relative to the largest |x W_ref^T| (tests, logs)."""
    want = F.linear(x.float(), reference.float())
    got = layer(x).float()
    return float((got - want).abs().max() / want.abs().max())
