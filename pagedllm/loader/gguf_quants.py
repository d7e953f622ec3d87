"""Dequantize GGUF (ggml) tensors with torch: results bit-identical to gguf.quants.dequantize.

A quantized tensor is a run of fixed-size blocks; each block holds its scale(s) and packed
integers. Every dequantizer here turns (num_blocks, block_bytes) uint8 into (num_blocks,
block_size) float32, written into `values`, with the same float32 operations in the same order
as gguf-py's numpy reference (`d * q - m` is a multiply then a subtract, never a fused one), so
the results are equal bit for bit. Block layouts (little-endian, "f16" a half-precision float):

    Q4_0  (32 values, 18 B)   f16 d | 16 B nibbles                      d * (q - 8)
    Q4_1  (32, 20)            f16 d | f16 m | 16 B nibbles              d * q + m
    Q5_0  (32, 22)            f16 d | u32 high bits | 16 B nibbles      d * (q - 16)
    Q5_1  (32, 24)            f16 d | f16 m | u32 high bits | nibbles   d * q + m
    Q8_0  (32, 34)            f16 d | 32 x i8                            d * q
    Q2_K  (256, 84)           16 B scales (4-bit scale | 4-bit min) | 64 B 2-bit q | f16 d | f16 dmin
    Q3_K  (256, 110)          32 B high-bit mask | 64 B 2-bit q | 12 B 6-bit scales | f16 d
    Q4_K  (256, 144)          f16 d | f16 dmin | 12 B 6-bit scales and mins | 128 B nibbles
    Q5_K  (256, 176)          f16 d | f16 dmin | 12 B scales and mins | 32 B high bits | 128 B nibbles
    Q6_K  (256, 210)          128 B low nibbles | 64 B high 2 bits | 16 x i8 scales | f16 d
    Q8_K  (256, 292)          f32 d | 256 x i8 | 16 x i16 block sums (unused here)   d * q

K-quants split the 256 values into sub-blocks of 16 or 32, each with its own 6- or 8-bit scale
(and min) relative to the block's f16 d (and dmin). Nibble order: byte j of a 32-byte run holds
value j in its low nibble and value j + 32 in its high nibble (value j + 16 for the 32-value types).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import torch

GGMLType = gguf.GGMLQuantizationType
# ggml type -> (values per block, bytes per block); plain float types are blocks of one value.
BLOCK_SIZES = {int(ggml_type): sizes for ggml_type, sizes in gguf.GGML_QUANT_SIZES.items()}
FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
# Values dequantized per step: 16M, 64 MiB of float32. Every step writes into memory that is already
# there (the output, or one float32 scratch for other dtypes): fresh pages are the dominant cost of a
# naive version, which allocates temporaries the size of each tensor. Each op of a step is one
# thread-pool barrier, and barriers cost most when other processes share the cores: on the busy
# 2-core machine, three of Qwen2.5-1.5B's Q4_K/Q6_K MLP matrices took 4.7-5.5 s in 16M steps against
# 10.7-12.0 s in 2M steps.
CHUNK_VALUES = 1 << 24


def _f16(blocks: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """The `count` f16s stored from byte `start` of each block, as float32 columns (n, count)."""
    return blocks[:, start : start + 2 * count].contiguous().view(torch.float16).float()


def _shifts(*amounts: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(amounts, dtype=torch.uint8, device=like.device)


def _bits(packed: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """packed (n, r, w) -> (n, r, len(shifts), w): field k of every byte, (byte >> shifts[k]) & mask."""
    return (packed.unsqueeze(2) >> shifts.view(1, 1, -1, 1)) & mask


def _nibbles(packed: torch.Tensor, run: int) -> torch.Tensor:
    """(n, bytes) -> (n, 2 * bytes) uint8: each run of `run` bytes gives `run` low nibbles, then `run` high."""
    n = packed.shape[0]
    return _bits(packed.reshape(n, -1, run), _shifts(0, 4, like=packed), 0x0F).reshape(n, -1)


def _bit_planes(packed: torch.Tensor) -> torch.Tensor:
    """K-quants' high bits, (n, run) bytes -> (n, 8 * run): bit b of byte j is value b * run + j."""
    n, run = packed.shape
    return _bits(packed.reshape(n, 1, run), torch.arange(8, dtype=torch.uint8, device=packed.device), 1).reshape(n, -1)


def _u32_bits(packed: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1's high bits, a little-endian u32 (n, 4 bytes) -> (n, 32): bit j is value j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


# --------------------------------------------------------------------------- 32-value blocks


def _nibbles_16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+16) of each block -> (n, 32) uint8: the 16 low nibbles, then the 16 high ones.
    Split in 32- or 16-bit words, the widest the block layout keeps aligned: a quarter or half as many
    elements as bytes (a byte's high nibble, shifted down, is masked clear of its neighbour's bits)."""
    unit, mask = (torch.int32, 0x0F0F0F0F) if start % 4 == 0 and blocks.shape[1] % 4 == 0 else (torch.int16, 0x0F0F)
    words = blocks.view(unit)[:, start // unit.itemsize : (start + 16) // unit.itemsize]
    q = torch.empty(blocks.shape[0], 2, 16, dtype=torch.uint8, device=blocks.device)
    halves = q.view(unit)
    torch.bitwise_and(words, mask, out=halves[:, 0])
    torch.bitwise_right_shift(words, 4, out=halves[:, 1]).bitwise_and_(mask)
    return q.view(-1, 32)


# The integers are copied to float32 first: torch.mul(uint8, float32, out=) would convert them in the
# same pass, but on torch 2.13's CPU that mixed-dtype loop is ~5x slower than a copy and a mul_.


def _q4_0(blocks: torch.Tensor, values: torch.Tensor) -> None:
    values.copy_(_nibbles_16(blocks, 2)).sub_(8).mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor, values: torch.Tensor) -> None:
    d_m = _f16(blocks, 0, count=2)
    values.copy_(_nibbles_16(blocks, 4)).mul_(d_m[:, :1]).add_(d_m[:, 1:])


def _q5_0(blocks: torch.Tensor, values: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 6:], 16) | (_u32_bits(blocks[:, 2:6]) << 4)
    values.copy_(q).sub_(16).mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor, values: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 8:], 16) | (_u32_bits(blocks[:, 4:8]) << 4)
    values.copy_(q).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks: torch.Tensor, values: torch.Tensor) -> None:
    values.copy_(blocks[:, 2:].view(torch.int8)).mul_(_f16(blocks, 0))


# --------------------------------------------------------------------------- K-quants (256 values)


def _scaled(values: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> None:
    """values = scale * q (- minimum), per sub-block: scale and minimum are (n, sub-blocks) float32."""
    n, groups = scale.shape
    out = values.view(n, groups, -1)
    out.copy_(q.view(n, groups, -1)).mul_(scale.unsqueeze(-1))
    if minimum is not None:
        out.sub_(minimum.unsqueeze(-1))


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8.

        bytes 0-3: sc[0..3] low 6 bits | sc[4..7] top 2 bits      bytes 8-11: sc[4..7] low 4 bits
        bytes 4-7: mn[0..3] low 6 bits | mn[4..7] top 2 bits                  mn[4..7] high 4 bits
    """
    d, m, m_d = packed.reshape(-1, 3, 4).unbind(1)
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _q2_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    scales = blocks[:, :16]
    q = _bits(blocks[:, 16:80].reshape(-1, 2, 32), _shifts(0, 2, 4, 6, like=blocks), 3)  # (n, 2, 4, 32)
    _scaled(values, q, _f16(blocks, 80) * (scales & 0x0F), _f16(blocks, 82) * (scales >> 4))


def _q3_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]  # 16 six-bit signed scales: low 4 bits in bytes 0-7, high 2 in bytes 8-11
    low = _nibbles(packed[:, :8], 8)
    high = _bits(packed[:, 8:].reshape(n, 1, 4), _shifts(0, 2, 4, 6, like=blocks), 3).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.int8) - 32
    low_q = _bits(blocks[:, 32:96].reshape(n, 2, 32), _shifts(0, 2, 4, 6, like=blocks), 3)  # (n, 2, 4, 32)
    # The high bit is a subtraction: a clear bit in hmask means q - 4.
    no_high = _bit_planes(blocks[:, :32]) ^ 1  # (n, 256)
    q = low_q.reshape(n, -1).to(torch.int8) - (no_high << 2).to(torch.int8)
    _scaled(values, q, _f16(blocks, 108) * scales)


def _q4_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    _scaled(values, _nibbles(blocks[:, 16:], 32), _f16(blocks, 0) * scales, _f16(blocks, 2) * mins)


def _q5_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    q = _nibbles(blocks[:, 48:], 32) | (_bit_planes(blocks[:, 16:48]) << 4)
    _scaled(values, q, _f16(blocks, 0) * scales, _f16(blocks, 2) * mins)


def _q6_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128], 64)  # (n, 256): two 128-value halves
    high = _bits(blocks[:, 128:192].reshape(n, 2, 32), _shifts(0, 2, 4, 6, like=blocks), 3).reshape(n, -1)
    q = (low | (high << 4)).to(torch.int8) - 32
    _scaled(values, q, _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8))


def _q8_k(blocks: torch.Tensor, values: torch.Tensor) -> None:
    d = blocks[:, :4].contiguous().view(torch.float32)
    values.copy_(blocks[:, 4:260].view(torch.int8)).mul_(d)


DEQUANTIZERS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.Q8_K: _q8_k,
}


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A tensor's bytes (uint8, maybe a view of the file) -> a tensor of `shape` in `dtype`: a fresh one,
    or `out` (contiguous, of that shape and dtype) written in place."""
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"dequantize into {tuple(out.shape)} {out.dtype}: expected contiguous {tuple(shape)} {dtype}")
    if ggml_type in FLOAT_TYPES:  # f16 / bf16 -> float32 is exact, so one rounding to dtype, as numpy's
        return out.copy_(raw.view(FLOAT_TYPES[ggml_type]).view(shape))
    if ggml_type not in DEQUANTIZERS:  # the IQ types and the rest: numpy, slower but complete
        return out.copy_(torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GGMLType(ggml_type))).reshape(shape))

    block_size, block_bytes = BLOCK_SIZES[ggml_type]
    blocks = raw.view(-1, block_bytes)
    chunk_blocks = max(1, CHUNK_VALUES // block_size)
    by_block = out.view(blocks.shape[0], block_size)
    scratch = None if dtype == torch.float32 else torch.empty(min(len(blocks), chunk_blocks), block_size)
    for start in range(0, len(blocks), chunk_blocks):
        chunk = blocks[start : start + chunk_blocks]
        values = by_block[start : start + len(chunk)] if scratch is None else scratch[: len(chunk)]
        DEQUANTIZERS[ggml_type](chunk, values)
        if scratch is not None:  # one rounding, float32 -> dtype, as in dequantize-then-.to(dtype)
            by_block[start : start + len(chunk)] = values
    return out
