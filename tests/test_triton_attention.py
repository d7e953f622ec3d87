"""The Triton attention kernels against the torch reference, on CPU through Triton's interpreter.

Each case is a step of sequences given as (context length after the step, new tokens):
decodes (new = 1) first, then prefill chunks; a chunk with new < context continues a
cached prefix, whose K/V are put in the cache beforehand. Pages are handed out in a
shuffled order so that a wrong block-table lookup cannot pass by luck.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import random

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention import triton_kernels as kernels  # noqa: E402
from pagedllm.attention.metadata import AttentionMetadata  # noqa: E402
from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402

# The interpreter's tl.dot multiplies bf16 as raw uint16 bits, so half precision is
# checked here with fp16 (same kernel path: fp32 accumulation, P cast to V's dtype);
# scripts/gpu_check_attention.py covers bf16 on the GPU.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


def make_step(seqs, num_decodes, block_size, num_kv_heads, head_dim, dtype, seed=0):
    """Metadata, caches holding each cached prefix, and new key/value for the step."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-ctx // block_size) for ctx, _ in seqs)
    num_blocks = len(seqs) * max_blocks + 3
    pages = list(range(num_blocks))
    random.Random(seed).shuffle(pages)
    block_tables = torch.tensor(pages[: len(seqs) * max_blocks], dtype=torch.int32).view(len(seqs), max_blocks)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots = []
    for i, (ctx, new) in enumerate(seqs):
        for pos in range(ctx - new, ctx):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    num_tokens = len(slots)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)

    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32),
        block_tables=block_tables,
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max(ctx for ctx, _ in seqs),
        query_start_loc_cpu=starts,
        seq_lens_cpu=[ctx for ctx, _ in seqs],
    )
    return meta, k_cache, v_cache, key, value


def run_both(seqs, num_decodes, block_size, num_heads, num_kv_heads, head_dim, dtype, sliding_window=None):
    meta, k_cache, v_cache, key, value = make_step(seqs, num_decodes, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(key.shape[0], num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = TorchAttentionBackend().forward(query, key, value, k_ref, v_ref, meta, scale, sliding_window)
    got = TritonAttentionBackend().forward(query, key, value, k_cache, v_cache, meta, scale, sliding_window)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "cache write differs"
    return got.float(), want.float()


# Decodes at context 1, on a block boundary and just past it; then a whole prompt, a chunk
# continuing a cached prefix, a chunk ending exactly on a block boundary and a 1-token chunk.
MIXED = [(1, 1), (16, 1), (17, 1), (33, 1), (20, 20), (37, 5), (64, 32), (33, 1)]


@pytest.mark.parametrize(
    "dtype, block_size, num_heads, num_kv_heads, head_dim",
    [
        (torch.float32, 16, 4, 2, 64),
        (torch.float32, 32, 3, 1, 64),
        (torch.float32, 16, 2, 2, 96),  # head dim padded to 128
        (torch.float32, 16, 9, 3, 64),  # SmolLM2's GQA group of 3: 42 tokens x 3 heads in a 128-row tile
        (torch.float16, 16, 4, 2, 64),
        (torch.float16, 32, 8, 2, 128),
    ],
)
def test_mixed_step_matches_torch(dtype, block_size, num_heads, num_kv_heads, head_dim):
    got, want = run_both(MIXED, 4, block_size, num_heads, num_kv_heads, head_dim, dtype)
    torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_prefill_only_and_decode_only_steps():
    for seqs, nd in [([(40, 40), (7, 7)], 0), ([(5, 1), (48, 1), (49, 1)], 3)]:
        got, want = run_both(seqs, nd, 16, 4, 2, 64, torch.float32)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_with_small_tiles(block_size):
    """Several query tiles and key tiles per chunk, tiles straddling pages both ways."""
    seqs = [(70, 70), (90, 45), (33, 33)]
    meta, k_cache, v_cache, key, value = make_step(seqs, 0, block_size, 1, 64, torch.float32)
    query = torch.randn(key.shape[0], 3, 64)
    want = TorchAttentionBackend().forward(query, key, value, k_cache, v_cache, meta, 0.125)
    got = torch.full_like(query, float("nan"))
    kernels.prefill_attention(got, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              0.125, first_seq=0, num_seqs=3, max_query_len=70, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_decode(dtype):
    """Partitions sized per sequence at run time: 19 of one 16-key tile for the longest context
    (so the reduction merges more than one chunk of partitions), uneven ones of two tiles, and
    a grid wider than the short contexts use (graph-style: num_partitions from a far bound)."""
    seqs = [(300, 1), (32, 1), (65, 1), (1, 1)]
    meta, k_cache, v_cache, key, value = make_step(seqs, 4, 16, 2, 64, dtype)
    query = torch.randn(4, 6, 64).to(dtype)
    kernels.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    want = TorchAttentionBackend._decode(query, k_cache, v_cache, meta, 0.125).float()
    for num_partitions, min_partition, block_n in [(19, 16, 16), (4, 64, 32), (40, 16, 16), (None, 128, 64)]:
        got = torch.full_like(query, float("nan"))
        kernels.decode_attention(got, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125,
                                 max_seq_len=4096, num_partitions=num_partitions, min_partition=min_partition,
                                 block_n=block_n)
        torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        # The last program of a sequence's partitions merges them and leaves the counts at zero:
        # a second call (as the next layer's) gives the same bits.
        again = torch.full_like(query, float("nan"))
        kernels.decode_attention(again, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125,
                                 max_seq_len=4096, num_partitions=num_partitions, min_partition=min_partition,
                                 block_n=block_n)
        assert torch.equal(again, got)


def test_decode_partitions_follow_batch_not_bound():
    """The grid does not grow with the graph's context bound, and a full GPU takes one partition
    (nothing to merge)."""
    assert kernels.decode_num_partitions(1, 8, 131072) == kernels.decode_num_partitions(1, 8, 8192) == 64
    assert kernels.decode_num_partitions(64, 8, 131072) == 1
    assert kernels.decode_num_partitions(1, 8, 100) == 1  # eager: the step's real maximum


@pytest.mark.parametrize("max_seq_len, num_partitions", [(16, 1), (64, 4)])
def test_padding_decode_gets_zeros(max_seq_len, num_partitions):
    """A CUDA-graph padding sequence (seq_len 0) yields zeros, not NaN, with and without split-K."""
    meta, k_cache, v_cache, _, _ = make_step([(9, 1), (1, 1)], 2, 16, 1, 64, torch.float32)
    seq_lens = torch.tensor([9, 0], dtype=torch.int32)
    query = torch.randn(2, 2, 64)
    got = torch.full_like(query, float("nan"))
    kernels.decode_attention(got, query, k_cache, v_cache, meta.block_tables, seq_lens, 0.125,
                             max_seq_len=max_seq_len, num_partitions=num_partitions, min_partition=4, block_n=16)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert not got[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a copy: bf16 is fine here
def test_write_kv_cache_skips_padding_slots(dtype):
    k_cache = torch.randn(4, 16, 2, 96).to(dtype)
    v_cache = torch.randn(4, 16, 2, 96).to(dtype)
    key, value = torch.randn(3, 2, 96).to(dtype), torch.randn(3, 2, 96).to(dtype)
    slots = torch.tensor([37, -1, 5], dtype=torch.int64)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want.view(-1, 2, 96)[[37, 5]] = key[[0, 2]]
    v_want.view(-1, 2, 96)[[37, 5]] = value[[0, 2]]
    kernels.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@pytest.mark.parametrize("window", [1, 20])
def test_sliding_window_matches_torch(window):
    """A window of only the query itself, and one longer than a key tile and some contexts; through the
    backends (decodes and chunks of one step), small prefill tiles and split-K decode."""
    got, want = run_both(MIXED, 4, 16, 4, 2, 64, torch.float32, sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    seqs = [(70, 70), (90, 45), (33, 33)]
    meta, k_cache, v_cache, key, value = make_step(seqs, 0, 16, 1, 64, torch.float32)
    query = torch.randn(key.shape[0], 3, 64)
    want = TorchAttentionBackend().forward(query, key, value, k_cache, v_cache, meta, 0.125, window)
    got = torch.full_like(query, float("nan"))
    kernels.prefill_attention(got, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              0.125, first_seq=0, num_seqs=3, max_query_len=70, block_m=16, block_n=16,
                              sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    meta, k_cache, v_cache, key, value = make_step([(300, 1), (32, 1), (1, 1)], 3, 16, 2, 64, torch.float32)
    query = torch.randn(3, 4, 64)
    kernels.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    want = TorchAttentionBackend._decode(query, k_cache, v_cache, meta, 0.125, sliding_window=window)
    got = torch.full_like(query, float("nan"))
    kernels.decode_attention(got, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125, max_seq_len=512,
                             num_partitions=19, min_partition=16, block_n=16, sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
