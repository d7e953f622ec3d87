"""The fused kernels against the torch code of the layers they stand in for: the Triton ones
(layers/triton_ops.py) on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported; scripts/gpu_kernels.py runs the same comparisons on the GPU), and
pagedllm's compiled CPU ones (layers/cpu_ops.py, float32 and bfloat16), with the paged KV cache
write and attention against the torch attention backend.

The reference is the layer's own torch path (PAGEDLLM_FUSED_KERNELS=0 here, so layers never
take a kernel), so a change to either side that breaks their agreement fails here. Hidden
sizes include non-powers of two (576: SmolLM2; 96 and 80: padded head dims) and sizes that
leave a tail after the 8-wide vectors of the CPU kernels (1000, 1100, 100).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

from pagedllm.attention.metadata import AttentionMetadata  # noqa: E402
from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.layers import cpu_kernels, cpu_ops, fused  # noqa: E402
from pagedllm.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402

# Triton's half precision is checked with fp16 here: the interpreter converts fp32 to bf16 by
# truncation, not round-to-nearest as the GPU and torch do (scripts/gpu_kernels.py checks
# bf16 on the GPU); the CPU kernels take float32 and bfloat16. Results are rounded where the
# torch code rounds; they may still differ by an ulp where an fp32 sum runs in another order.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=2e-3),
             torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_DTYPES = (torch.float32, torch.bfloat16)
# (activations, KV cache) of the CPU attention: float32 models with each cache, bfloat16 ones with theirs and float16
ACTIVATION_AND_CACHE_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16)]  # fmt: skip


def _triton_ops():
    pytest.importorskip("triton")
    from pagedllm.layers import triton_ops

    return triton_ops


def _cpu_ops():
    if cpu_kernels.lib() is None:
        pytest.skip("pagedllm's CPU kernels do not run here")
    return cpu_ops


@pytest.fixture(params=["triton", "cpu"])
def ops(request, dtype):
    if request.param == "cpu" and dtype not in CPU_DTYPES:
        pytest.skip("the CPU kernels take float32 and bfloat16")
    if request.param == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates to bfloat16 (checked on the GPU: scripts/gpu_kernels.py)")
    return _triton_ops() if request.param == "triton" else _cpu_ops()


@pytest.fixture(autouse=True)
def layers_on_torch(monkeypatch):
    """The layers (the reference) take their torch code; the kernels are called directly."""
    monkeypatch.setenv("PAGEDLLM_FUSED_KERNELS", "0")
    fused.reset()
    yield
    monkeypatch.undo()
    fused.reset()


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm_with_and_without_residual(ops, dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, dtype=dtype, seed=1) + 1)
    x, residual = randn(7, hidden, dtype=dtype, seed=2), randn(7, hidden, dtype=dtype, seed=3) * 4
    x_before, residual_before = x.clone(), residual.clone()

    torch.testing.assert_close(ops.rms_norm(x, norm.weight, norm.eps), norm(x), **TOLERANCE[dtype])
    got, got_residual = ops.rms_norm(x, norm.weight, norm.eps, residual)
    want, want_residual = norm(x, residual)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.equal(got_residual, want_residual), "the residual sum is one rounding of x + residual"
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs are left as they are"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_slice(ops, dtype):
    """Qwen3's q_norm: (T, H, D) heads sliced out of a fused qkv output, not contiguous."""
    T, H, D = 5, 3, 128
    qkv = randn(T, H * D + 2 * D, dtype=dtype)
    q = qkv[:, : H * D].reshape(T, H, D)
    assert not q.is_contiguous()
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(D, dtype=dtype, seed=4))
    torch.testing.assert_close(ops.rms_norm(q, norm.weight, norm.eps), norm(q), **TOLERANCE[dtype])


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads, scaling", [
    (64, 9, 3, None),  # SmolLM2's heads
    (128, 8, 2, LLAMA3_SCALING),  # Llama 3 frequencies
    (96, 4, 4, {"rope_type": "linear", "factor": 2.0}),  # half 48: padded to 64
])
def test_rotary_in_place_on_qkv_views(ops, dtype, head_dim, num_heads, num_kv_heads, scaling):
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, scaling)
    T = 6
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(T, q_size + 2 * kv_size, dtype=dtype)
    positions = torch.tensor([0, 1, 17, 200, 511, 3])
    q = qkv[:, :q_size].view(T, num_heads, head_dim)
    k = qkv[:, q_size: q_size + kv_size].view(T, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size:].clone()
    want_q, want_k = rotary(positions, q.clone(), k.clone())

    got_q, got_k = ops.rotary_inplace_(positions, q, k, rotary.cos_sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr(), "rotated in place"
    torch.testing.assert_close(q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, q_size + kv_size:], v_before), "v, beside k in the same buffer, is untouched"


# sigmoid(g) = 1 / (1 + exp(-g)) overflows to 1 / inf = 0 for very negative g, as intended
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1536, 1100])  # 1536: SmolLM2's ffn (two column blocks); 1100: masked
@pytest.mark.parametrize("layer, kernel", [(SiluAndMul, "silu_and_mul"), (GeluAndMul, "gelu_tanh_and_mul")])
def test_gated_activations(ops, dtype, width, layer, kernel):
    x = randn(5, 2 * width, dtype=dtype) * 3
    x[0, :8] = torch.tensor([-100.0, -30.0, -10.0, 0.0, 10.0, 30.0, 60.0, 100.0])  # the ends of e^x
    torch.testing.assert_close(getattr(ops, kernel)(x), layer()(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32])
def test_empty_batches(ops):
    """A step can have zero tokens on a rank's path: no launch, right shapes."""
    assert ops.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    out, res = ops.rms_norm(torch.empty(0, 16), torch.ones(16), 1e-6, torch.empty(0, 16))
    assert out.shape == res.shape == (0, 16)
    q, k = torch.empty(0, 2, 8), torch.empty(0, 1, 8)
    ops.rotary_inplace_(torch.empty(0, dtype=torch.long), q, k, torch.zeros(4, 8))


def _decode_metadata(block_tables: torch.Tensor, seq_lens: list[int]) -> AttentionMetadata:
    """A step of one new token per sequence, written at the last position of each."""
    block_size = 16
    slots = [int(block_tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size for b, n in enumerate(seq_lens)]
    batch = len(seq_lens)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables, num_decodes=batch,
        num_decode_tokens=batch, max_query_len=1, max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=seq_lens,
    )


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 100), (8, 1, 128)])
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("batch", [4, 40])
@pytest.mark.parametrize("dtype, cache_dtype", ACTIVATION_AND_CACHE_DTYPES)
def test_cpu_paged_decode_attention(num_heads, num_kv_heads, head_dim, sliding_window, batch, dtype, cache_dtype):
    """The CPU kernels' cache write and decode attention (blocks read in place) against the torch
    backend's (gathered, padded, masked): GQA groups, a head dim with a tail, contexts of several
    lengths over scattered blocks, a sliding window, and v a strided view of a qkv output. A few
    sequences split their kv heads over threads; many are one task each. A float16 or bfloat16
    cache is written with the same rounding as torch's and read back into float32 arithmetic;
    bfloat16 queries are widened, the result rounded once."""
    ops = _cpu_ops()
    lens = [[1, 37, 90, 16][b % 4] + b % 7 for b in range(batch)]
    num_blocks = 6 * batch + 16
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5))[: 6 * batch].int().view(batch, 6)
    meta = _decode_metadata(tables, lens)
    k_cache = randn(num_blocks, 16, num_kv_heads, head_dim, dtype=cache_dtype, seed=6)
    v_cache = randn(num_blocks, 16, num_kv_heads, head_dim, dtype=cache_dtype, seed=7)
    query = randn(batch, num_heads, head_dim, dtype=dtype, seed=8)
    kv = randn(batch, 3 * num_kv_heads * head_dim, dtype=dtype, seed=9)  # [k | v | other]
    key = kv[:, : num_kv_heads * head_dim].view(batch, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(batch, num_kv_heads, head_dim)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = TorchAttentionBackend().forward(query, key, value, want_k, want_v, meta, head_dim**-0.5, sliding_window)
    got_k, got_v = k_cache.clone(), v_cache.clone()
    ops.write_kv_cache(key, value, got_k, got_v, meta.slot_mapping)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    got = ops.paged_attention(query, got_k, got_v, tables, meta.seq_lens, head_dim**-0.5, sliding_window)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_cpu_cache_write_skips_padding_slots():
    ops = _cpu_ops()
    k_cache, v_cache = torch.zeros(2, 16, 1, 8), torch.zeros(2, 16, 1, 8)
    key, value = torch.ones(2, 1, 8), torch.full((2, 1, 8), 2.0)
    ops.write_kv_cache(key, value, k_cache, v_cache, torch.tensor([17, -1]))
    assert k_cache.view(-1, 8)[17].eq(1).all() and v_cache.view(-1, 8)[17].eq(2).all()
    assert k_cache.sum() == 8 and v_cache.sum() == 16, "the padding token wrote nothing"


@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("dtype, cache_dtype", ACTIVATION_AND_CACHE_DTYPES)
def test_cpu_paged_attention_of_a_mixed_step(sliding_window, dtype, cache_dtype):
    """A step of two decodes and three prefill chunks (a whole prompt longer than a row tile and a piece, the
    rest of a prompt after 37 cached tokens, one token after 16) through the CPU kernel against the
    torch backend's SDPA; and each token's row bit for bit the same when its prompt is cut
    elsewhere: the kernel's result for a token does not depend on the rows beside it."""
    ops = _cpu_ops()
    heads, kv_heads, dim, block = 9, 3, 64, 16
    q_lens, seq_lens = [1, 1, 80, 9, 1], [23, 70, 80, 46, 17]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    tables = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:25].int().view(5, 5)
    slots = [int(tables[b, p // block]) * block + p % block for b, (q, n) in enumerate(zip(q_lens, seq_lens)) for p in range(n - q, n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables, num_decodes=2, num_decode_tokens=2,
        max_query_len=80, max_seq_len=80, query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
    )
    tokens = starts[-1]
    k_cache = randn(40, block, kv_heads, dim, dtype=cache_dtype, seed=1)
    v_cache = randn(40, block, kv_heads, dim, dtype=cache_dtype, seed=2)
    query, key, value = (randn(tokens, h, dim, dtype=dtype, seed=s) for h, s in ((heads, 3), (kv_heads, 4), (kv_heads, 5)))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = TorchAttentionBackend().forward(query, key, value, want_k, want_v, meta, dim**-0.5, sliding_window)
    ops.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    got = ops.paged_attention(query, k_cache, v_cache, tables, meta.seq_lens, dim**-0.5, sliding_window, meta.query_start_loc)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    # the 80-token prompt (rows 2..81) cut after 13 and after 70 tokens: the same rows, bit for bit
    first, whole = starts[2], got[starts[2] : starts[3]]
    for cut in (13, 70):
        parts = [
            ops.paged_attention(query[first + a : first + b], k_cache, v_cache, tables[2:3], torch.tensor([b], dtype=torch.int32),
                                dim**-0.5, sliding_window, torch.tensor([0, b - a], dtype=torch.int32))  # fmt: skip
            for a, b in ((0, cut), (cut, 80))
        ]
        assert torch.equal(torch.cat(parts), whole)
    # and one token alone, as a decode step
    alone = ops.paged_attention(query[first + 79 : first + 80], k_cache, v_cache, tables[2:3], torch.tensor([80], dtype=torch.int32),
                                dim**-0.5, sliding_window)  # fmt: skip
    assert torch.equal(alone[0], whole[79])
