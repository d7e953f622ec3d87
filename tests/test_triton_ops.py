"""The fused Triton kernels of layers/triton_ops.py against the torch code of the layers
they stand in for, on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported). scripts/gpu_kernels.py runs the same comparisons on the GPU.

The reference is the layer's own torch path (CPU tensors never take the kernels), so a
change to either side that breaks their agreement fails here. Hidden sizes include
non-powers of two (576: SmolLM2; 96 and 80: padded head dims).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.layers import triton_ops  # noqa: E402
from pagedllm.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402

# Half precision is checked with fp16 here: the interpreter converts fp32 to bf16 by
# truncation, not round-to-nearest as the GPU and torch do (scripts/gpu_kernels.py checks
# bf16 on the GPU). Results are rounded where the torch code rounds; they may still differ
# by an ulp where an fp32 sum runs in another order.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.float16]


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, dtype=dtype, seed=1) + 1)
    x, residual = randn(7, hidden, dtype=dtype, seed=2), randn(7, hidden, dtype=dtype, seed=3) * 4
    x_before, residual_before = x.clone(), residual.clone()

    torch.testing.assert_close(triton_ops.rms_norm(x, norm.weight, norm.eps), norm(x), **TOLERANCE[dtype])
    got, got_residual = triton_ops.rms_norm(x, norm.weight, norm.eps, residual)
    want, want_residual = norm(x, residual)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.equal(got_residual, want_residual), "the residual sum is one rounding of x + residual"
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs are left as they are"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_slice(dtype):
    """Qwen3's q_norm: (T, H, D) heads sliced out of a fused qkv output, not contiguous."""
    T, H, D = 5, 3, 128
    qkv = randn(T, H * D + 2 * D, dtype=dtype)
    q = qkv[:, : H * D].reshape(T, H, D)
    assert not q.is_contiguous()
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(D, dtype=dtype, seed=4))
    torch.testing.assert_close(triton_ops.rms_norm(q, norm.weight, norm.eps), norm(q), **TOLERANCE[dtype])


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads, scaling", [
    (64, 9, 3, None),  # SmolLM2's heads
    (128, 8, 2, LLAMA3_SCALING),  # Llama 3 frequencies
    (96, 4, 4, {"rope_type": "linear", "factor": 2.0}),  # half 48: padded to 64
])
def test_rotary_in_place_on_qkv_views(dtype, head_dim, num_heads, num_kv_heads, scaling):
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, scaling)
    T = 6
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(T, q_size + 2 * kv_size, dtype=dtype)
    positions = torch.tensor([0, 1, 17, 200, 511, 3])
    q = qkv[:, :q_size].view(T, num_heads, head_dim)
    k = qkv[:, q_size: q_size + kv_size].view(T, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size:].clone()
    want_q, want_k = rotary(positions, q.clone(), k.clone())

    got_q, got_k = triton_ops.rotary_inplace_(positions, q, k, rotary.cos_sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr(), "rotated in place"
    torch.testing.assert_close(q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, q_size + kv_size:], v_before), "v, beside k in the same buffer, is untouched"


# sigmoid(g) = 1 / (1 + exp(-g)) overflows to 1 / inf = 0 for very negative g, as intended
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1536, 1100])  # 1536: SmolLM2's ffn (two column blocks); 1100: masked
@pytest.mark.parametrize("layer, kernel", [(SiluAndMul, triton_ops.silu_and_mul),
                                           (GeluAndMul, triton_ops.gelu_tanh_and_mul)])
def test_gated_activations(dtype, width, layer, kernel):
    x = randn(5, 2 * width, dtype=dtype) * 3
    torch.testing.assert_close(kernel(x), layer()(x), **TOLERANCE[dtype])


def test_empty_batches():
    """A step can have zero tokens on a rank's path: no launch, right shapes."""
    assert triton_ops.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    out, res = triton_ops.rms_norm(torch.empty(0, 16), torch.ones(16), 1e-6, torch.empty(0, 16))
    assert out.shape == res.shape == (0, 16)
    q, k = torch.empty(0, 2, 8), torch.empty(0, 1, 8)
    triton_ops.rotary_inplace_(torch.empty(0, dtype=torch.long), q, k, torch.zeros(4, 8))
