"""The torch dequantizers against gguf-py's numpy reference, bit for bit, on synthetic blocks.

Blocks are random bytes (every bit pattern of the packed fields occurs) with finite random
f16 / f32 scales written over their scale fields, so no NaN hides a difference.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagedllm.loader import gguf_quants
from pagedllm.loader.gguf_quants import BLOCK_SIZES, dequantize

Q = gguf.GGMLQuantizationType
# type -> byte offsets of its f16 scale fields (and f32 for Q8_K) inside a block
SCALE_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0],
}  # fmt: skip
TORCH_TYPES = [t for t in SCALE_FIELDS if t != Q.IQ4_NL] + [Q.Q8_K]


def synthetic_blocks(ggml_type: Q, num_blocks: int, seed: int = 0) -> np.ndarray:
    block_size, block_bytes = BLOCK_SIZES[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (num_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_FIELDS.get(ggml_type, []):
        blocks[:, offset : offset + 2] = rng.standard_normal((num_blocks, 1)).astype(np.float16).view(np.uint8)
    if ggml_type == Q.Q8_K:
        blocks[:, :4] = rng.standard_normal((num_blocks, 1)).astype(np.float32).view(np.uint8)
    return blocks


def q8_k_reference(blocks: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K (gguf-py has none): y = d * q, d the block's f32."""
    d = blocks[:, :4].copy().view(np.float32)
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)


@pytest.mark.parametrize("ggml_type", TORCH_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_gguf_py(ggml_type, monkeypatch):
    """Several chunks, the last one partial, into float32 and bfloat16."""
    block_size, _ = BLOCK_SIZES[ggml_type]
    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 3 * block_size)
    blocks = synthetic_blocks(ggml_type, 10)
    if ggml_type == Q.Q8_K:
        expected = q8_k_reference(blocks)
    else:
        expected = gguf.quants.dequantize(blocks, ggml_type)
    shape = (2, 5 * block_size)
    got = dequantize(torch.from_numpy(blocks).reshape(-1), ggml_type, shape, torch.float32)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(expected.reshape(shape)))
    bf16 = dequantize(torch.from_numpy(blocks).reshape(-1), ggml_type, shape, torch.bfloat16)
    assert torch.equal(bf16, got.to(torch.bfloat16))


@pytest.mark.parametrize("ggml_type", [Q.F16, Q.BF16], ids=lambda t: t.name)
def test_half_floats_are_exact(ggml_type):
    rng = np.random.default_rng(1)
    values = rng.standard_normal(64).astype(np.float32)
    raw = gguf.quants.quantize(values, ggml_type).view(np.uint8).reshape(-1)
    expected = gguf.quants.dequantize(raw, ggml_type)
    got = dequantize(torch.from_numpy(raw.copy()), ggml_type, (4, 16), torch.float32)
    assert torch.equal(got, torch.from_numpy(np.asarray(expected, np.float32).reshape(4, 16)))


def test_other_types_fall_back_to_gguf_py():
    blocks = synthetic_blocks(Q.IQ4_NL, 3)
    got = dequantize(torch.from_numpy(blocks).reshape(-1), Q.IQ4_NL, (96,), torch.float32)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(blocks, Q.IQ4_NL).reshape(-1)))
