"""Triton kernels for paged attention: cache write, prefill (varlen, causal) and split-K decode.

Layout and metadata are the ones of metadata.py. Every kernel reads K/V through the
block tables; the shared piece is the paged tile load (_paged_rows, _load_rows):

    context position p of sequence s  ->  page  = block_tables[s, p // BLOCK_SIZE]
                                          row   = p % BLOCK_SIZE
    k_cache[page, row, kv_head, :]

A tile of BLOCK_N positions may straddle pages (BLOCK_N and the cache's BLOCK_SIZE are
independent), so the page is looked up per position, not per tile.

GQA: the GROUP = num_heads // num_kv_heads query heads of a kv head share one program,
stacked as rows of the query tile, so each K/V tile is loaded once for all of them. The
prefill tile packs them unpadded (BLOCK_M // GROUP tokens x GROUP heads), so a group of 3
(SmolLM2) fills 126 of 128 rows rather than 96.
Softmax runs in the log2 domain (scores are pre-multiplied by scale * log2(e)) with fp32
running max / sum / accumulator, flash-attention style.

Head dims that are not powers of two (96, 80, ...) are padded to HEAD_DIM_PAD and masked.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm.layers.arrival_counts import arrival_counts

LOG2E = 1.4426950408889634
# A running max that starts finite keeps exp2(m_old - m_new) at 1, not NaN, on rows
# that see no key yet (padding rows, padding heads of a GQA group).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _paged_rows(table_ptr, positions, valid, kv_head, stride_block, stride_slot, stride_head,
                BLOCK_SIZE: tl.constexpr):
    """Offsets into k_cache / v_cache (they share a layout) of one kv head at `positions`."""
    page = tl.load(table_ptr + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return page * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head


@triton.jit
def _load_rows(cache_ptr, rows, valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """[len(rows), HEAD_DIM_PAD] tile, zeros in padding."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    if HEAD_DIM == HEAD_DIM_PAD:  # no mask along the head dim, so loads stay vectorised
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
    return tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _attend(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, lo, hi, qk_scale,
            stride_block, stride_slot, stride_head,
            MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
            HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, window=0):
    """Online softmax of the q rows over context positions [lo, hi), BLOCK_N keys at a time.

    Carries (running max m_i, running sum l_i, unnormalised output acc) in fp32. MASK is
    "none" (every key visible to every row), "bounds" (the last tile may run past hi) or
    "causal" (row r sees keys at positions <= q_pos[r]; tiles past hi are masked by it) or
    "sliding" (causal, and only keys at positions > q_pos[r] - window).
    """
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        rows = _paged_rows(table_ptr, pos, valid, kv_head, stride_block, stride_slot, stride_head, BLOCK_SIZE)
        k = _load_rows(k_cache_ptr, rows, valid, HEAD_DIM, HEAD_DIM_PAD)
        v = _load_rows(v_cache_ptr, rows, valid, HEAD_DIM, HEAD_DIM_PAD)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 domain
        if MASK == "causal":
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        elif MASK == "sliding":
            visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        elif MASK == "bounds":
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# ---------------------------------------------------------------------------- cache write


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                     stride_block, stride_slot, stride_head,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = dims < HEAD_DIM
    dst = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot + kv_head * stride_head + dims
    k = tl.load(key_ptr + token * stride_k_tok + kv_head * stride_k_head + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + kv_head * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


# ---------------------------------------------------------------------------- prefill


# Integer arguments that change from step to step are not specialized on (Triton compiles a
# variant per value class: == 1, % 16 == 0, other), or a new mix of decodes and prefills
# would stall a step for a compilation in the middle of serving.
@triton.jit(do_not_specialize=["first_seq", "stride_table"])
def _prefill_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    qk_scale, first_seq, window,
                    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_table,
                    stride_block, stride_slot, stride_head,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr = False):
    """Grid (num_prefills, cdiv(max_query_len, BLOCK_Q), num_kv_heads), BLOCK_Q = BLOCK_M // GROUP.

    The query tile is BLOCK_Q tokens x GROUP heads, token-major, in BLOCK_M rows (the last
    BLOCK_M - BLOCK_Q * GROUP rows are padding):

        row r -> token q_tile * BLOCK_Q + r // GROUP,  head kv_head * GROUP + r % GROUP

    The chunk's queries are the last q_len of seq_len context positions, so query i sits
    at position ctx_start + i (ctx_start = seq_len - q_len) and sees keys 0..that position:

        keys:    0 1 2 3 4 5 6 7 8 9          seq_len = 10, q_len = 4, ctx_start = 6
        query 0  x x x x x x x . . .
        query 3  x x x x x x x x x x
    """
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    seq = first_seq + tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (last) tiles start first
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid is sized for the longest chunk
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (q_idx < q_len) & (rows < BLOCK_Q * GROUP)
    q_pos = ctx_start + q_idx
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :],
                mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    # Keys up to the tile's first query position are visible to every row: no mask there.
    # Then the diagonal band, causally masked; keys past the tile's last query are masked
    # for every row, so the loop stops there.
    #
    #   keys  0 ........................ full_end ....... kv_end
    #         |  MASK="none", whole tiles  | "causal"       |
    first_pos = ctx_start + q_tile * BLOCK_Q
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = ctx_start + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    if SLIDING:  # keys from the tile's first query's window start on, each row masked to its own window
        window_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        m_i, l_i, acc = _attend(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kv_head, window_start,
                                kv_end, qk_scale, stride_block, stride_slot, stride_head, "sliding", BLOCK_N,
                                BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, window)
    else:
        m_i, l_i, acc = _attend(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kv_head, 0, full_end,
                                qk_scale, stride_block, stride_slot, stride_head, "none", BLOCK_N, BLOCK_SIZE,
                                HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
        m_i, l_i, acc = _attend(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kv_head, full_end, kv_end,
                                qk_scale, stride_block, stride_slot, stride_head, "causal", BLOCK_N, BLOCK_SIZE,
                                HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------- decode


@triton.jit
def _partitions(seq_len, num_partitions, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr):
    """(partitions this sequence uses, positions per partition): at most num_partitions, each
    whole BLOCK_N tiles and at least MIN_PARTITION long (but the last), none empty."""
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    wanted = tl.maximum(tl.minimum(num_partitions, tl.cdiv(seq_len, MIN_PARTITION)), 1)
    tiles_per_part = tl.maximum(tl.cdiv(num_tiles, wanted), 1)
    return tl.maximum(tl.cdiv(num_tiles, tiles_per_part), 1), tiles_per_part * BLOCK_N


@triton.jit(do_not_specialize=["num_partitions", "stride_table"])
def _decode_kernel(out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, arrivals_ptr,
                   q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qk_scale, num_partitions,
                   stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_table,
                   stride_block, stride_slot, stride_head,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   MIN_PARTITION: tl.constexpr, MERGE_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   window=0, SLIDING: tl.constexpr = False):
    """Grid (num_decodes, num_kv_heads, num_partitions): one query token per sequence.

    Split-K: each sequence's context is cut into up to num_partitions pieces of equal
    length (whole BLOCK_N tiles), sized from its own seq_len at run time, one program each,
    so a long context keeps many SMs busy at small batch. seq_len = 1000, 4 partitions, BLOCK_N 64:

        positions  0 ..... 255 | 256 .... 511 | 512 .... 767 | 768 .. 999
        program    part 0      | part 1       | part 2       | part 3

    A short context uses fewer (none shorter than MIN_PARTITION); programs past them return
    at once. The host picks num_partitions from the batch and an upper bound of seq_len only
    (fixed grid for CUDA graphs, whatever the bound: a graph captured at max_model_len 131072
    runs the same grid as one at 2048; a run-time value, so no recompilation). A sequence
    that uses a single partition (or is a seq_len-0 padding sequence) is normalised and
    written at once. With several, each program stores its (max, sum, unnormalised acc) per
    head and counts itself in arrivals[seq, kv_head]; the last to arrive merges the
    partitions in partition order (the same sum whatever order they ran in), writes the
    output and sets the count back to zero for the next call: no second kernel.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    seq_parts, part_len = _partitions(seq_len, num_partitions, BLOCK_N, MIN_PARTITION)
    if part >= seq_parts:  # part 0 always runs: it writes the zeros of padding
        return
    part_start = part * part_len
    part_end = tl.minimum(part_start + part_len, seq_len)
    if SLIDING:  # the query (at seq_len - 1) sees the last `window` keys; a partition before them sees none
        part_start = tl.minimum(tl.maximum(part_start, seq_len - window), part_end)

    # Rows are the GROUP query heads of this kv head, padded to >= 16 for tl.dot.
    rows = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = (rows < GROUP)[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_tok + head[:, None] * stride_q_head + dims[None, :], mask=io_mask, other=0.0)

    m_i = tl.full([GROUP_PAD], NEG_BIG, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    m_i, l_i, acc = _attend(q, None, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kv_head, part_start, part_end,
                            qk_scale, stride_block, stride_slot, stride_head, "bounds", BLOCK_N, BLOCK_SIZE,
                            HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)

    if seq_parts <= 1:
        # seq_len 0 leaves l_i = 0: write zeros, not NaN.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_o_tok + head[:, None] * stride_o_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partials: [num_decodes, num_heads, num_partitions] (+ [HEAD_DIM_PAD] for acc), contiguous
        part_idx = (seq * GROUP * tl.num_programs(1) + head).to(tl.int64) * num_partitions + part
        head_valid = rows < GROUP
        tl.store(part_max_ptr + part_idx, m_i, mask=head_valid)
        tl.store(part_sum_ptr + part_idx, l_i, mask=head_valid)
        tl.store(part_acc_ptr + part_idx[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=head_valid[:, None])
        tl.debug_barrier()  # every thread's partials are stored before the count says so
        arrivals = arrivals_ptr + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") == seq_parts - 1:
            heads = kv_head * GROUP + tl.arange(0, GROUP_P2)
            valid = tl.arange(0, GROUP_P2) < GROUP
            out = _merge_partitions(part_max_ptr, part_sum_ptr, part_acc_ptr, seq, heads, valid, seq_parts,
                                    GROUP * tl.num_programs(1), num_partitions, HEAD_DIM_PAD, MERGE_CHUNK)
            tl.store(out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (dims[None, :] < HEAD_DIM))
            tl.atomic_xchg(arrivals, 0)


@triton.jit
def _merge_partitions(part_max_ptr, part_sum_ptr, part_acc_ptr, seq, heads, valid, num_parts, num_heads,
                      num_partitions, HEAD_DIM_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """The output rows of `heads` [R] from their num_parts partials, CHUNK partitions at a time.

    Partition j holds m_j (log2-domain max), l_j = sum 2^(s - m_j), acc_j = sum 2^(s - m_j) v.
    With M the max over j:  out = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j,
    merged online over chunks of partitions exactly like keys in _attend. Loads bypass L1:
    other programs stored the partials.
    """
    base = (seq * num_heads + heads).to(tl.int64) * num_partitions  # [R]
    dims = tl.arange(0, HEAD_DIM_PAD)
    m = tl.full(heads.shape, NEG_BIG, tl.float32)
    l = tl.zeros(heads.shape, tl.float32)
    acc = tl.zeros([heads.shape[0], HEAD_DIM_PAD], tl.float32)
    for chunk_start in range(0, num_parts, CHUNK):
        parts = chunk_start + tl.arange(0, CHUNK)
        idx = base[:, None] + parts[None, :]  # [R, CHUNK]
        ok = valid[:, None] & (parts < num_parts)[None, :]
        m_j = tl.load(part_max_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_j = tl.load(part_sum_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
        acc_j = tl.load(part_acc_ptr + idx[:, :, None] * HEAD_DIM_PAD + dims[None, None, :], mask=ok[:, :, None],
                        other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(m_j, 1))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(m_j - m_new[:, None])
        l = l * alpha + tl.sum(w * l_j, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * acc_j, 1)
        m = m_new
    return acc / tl.where(l == 0.0, 1.0, l)[:, None]


# ---------------------------------------------------------------------------- launchers


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share one layout"
    assert k_cache.stride(-1) == 1, "the head dim of the cache must be contiguous"


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    return cache.stride(0), cache.stride(1), cache.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    # Full fp32 products for fp32 inputs (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Scatter key/value [T, Hkv, D] to their flat slots; slots < 0 are skipped."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), *_cache_strides(k_cache),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) of the prefill kernel.

    8 warps for 128-row tiles were measured best on an H100 (4 x 2048 tokens, D 64 and 128).
    Hopper gets a third pipeline stage (its 228 KB of shared memory hold Q plus three K/V
    tiles up to D 128 in bf16); head dims past 128 and fp32 get smaller tiles so that Q and
    two stages of K/V fit (scripts/gpu_kernels.py --sweep times the alternatives).
    """
    d_bytes = triton.next_power_of_2(head_dim) * dtype.itemsize
    hopper = device.type == "cuda" and _compute_capability(device)[0] >= 9
    if d_bytes > 256:  # D 256 in bf16, D 128 in fp32
        return 64, 32, 4, 2
    return 128, 64, 8, 3 if hopper else 2


def prefill_attention(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                      first_seq: int, num_seqs: int, max_query_len: int, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      sliding_window: int | None = None) -> None:
    """Causal attention of sequences first_seq .. first_seq + num_seqs - 1 (chunks of any length);
    with sliding_window, a query at position p sees keys at positions > p - sliding_window only.

    out/query: [T, H, D], rows taken through query_start_loc. block_m is the query tile
    in rows (tokens x GQA group); block_n the key tile; unset ones come from prefill_config.
    """
    _check_cache(k_cache, v_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, f"{num_heads} heads is not a multiple of {num_kv_heads} kv heads"
    config = prefill_config(head_dim, query.dtype, query.device)
    block_m, block_n, num_warps, num_stages = (given or default for given, default in
                                               zip((block_m, block_n, num_warps, num_stages), config))
    block_m = max(block_m, triton.next_power_of_2(group))  # at least one token per tile
    grid = (num_seqs, triton.cdiv(max_query_len, block_m // group), num_kv_heads)
    _prefill_kernel[grid](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale * LOG2E, first_seq,
        sliding_window or 0, query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), DOT_PRECISION=_dot_precision(query.dtype),
        SLIDING=sliding_window is not None, num_warps=num_warps, num_stages=num_stages,
    )


def decode_num_partitions(num_seqs: int, num_kv_heads: int, max_seq_len: int, min_partition: int = 128) -> int:
    """Split-K partitions per sequence: one where the batch alone gives at least 256 programs
    (about 2 per SM of an H100, 132 SMs); else enough for about 512, and no more than
    partitions of min_partition positions of max_seq_len.

    Fewer partitions mean less partial traffic and merge work: on an H200 at context 640, 64
    sequences x 4 kv heads (llama-8b at TP=2) ran 12% faster in one partition than in two, and
    x 8 kv heads one partition ran at the copy bandwidth; more give parallelism at small batch.
    At one partition nothing is merged.
    """
    programs = num_seqs * num_kv_heads
    if programs >= 256:
        return 1
    return max(1, min(triton.cdiv(512, programs), triton.cdiv(max_seq_len, min_partition)))


# The decode kernel's shared memory: K and V tiles, num_stages deep, stay under this.
_DECODE_SMEM_BYTES = 200 * 1024


def decode_config(num_seqs: int, num_kv_heads: int, head_dim_pad: int, elem_size: int) -> tuple[int, int]:
    """(block_n, num_stages) of the decode kernel, from a sweep on an H200 (block_n 32-128,
    2-8 warps, 2-4 stages; docs/benchmarks.md): three stages everywhere (two stalled on the
    loads), key tiles of 128 below 512 programs (a batch-1 layer 7.5 -> 6.5 us, 64 x 4 kv
    heads 28.6 -> 25.4 us) and of 64 from there (64 x 8 kv heads: 128 was slower); smaller
    tiles or fewer stages where the tiles would not fit (fp32, head dims over 128)."""
    block_n = 64 if num_seqs * num_kv_heads >= 512 else 128
    while block_n > 16:
        for stages in (3, 2):
            if stages * 2 * block_n * head_dim_pad * elem_size <= _DECODE_SMEM_BYTES:
                return block_n, stages
        block_n //= 2
    return block_n, 1


def decode_attention(out, query, k_cache, v_cache, block_tables, seq_lens, scale: float, max_seq_len: int,
                     num_partitions: int | None = None, min_partition: int = 128, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None, sliding_window: int | None = None) -> None:
    """One query token per sequence: out/query [num_seqs, H, D], seq_lens/block_tables indexed alike.

    CUDA-graph safe: nothing is read from the device here. max_seq_len is a Python upper
    bound of seq_lens (under a graph, the capture bound, e.g. max_model_len); it and the
    shapes fix the grid. Sequences with seq_len 0 (padding) get zeros.
    """
    _check_cache(k_cache, v_cache)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, f"{num_heads} heads is not a multiple of {num_kv_heads} kv heads"
    if num_seqs == 0:
        return
    if num_partitions is None:
        num_partitions = decode_num_partitions(num_seqs, num_kv_heads, max_seq_len, min_partition)
    head_dim_pad = triton.next_power_of_2(head_dim)
    default_block_n, default_stages = decode_config(num_seqs, num_kv_heads, head_dim_pad, k_cache.element_size())
    block_n, num_stages = block_n or default_block_n, num_stages or default_stages
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n, MIN_PARTITION=min_partition)

    part_max = part_sum = part_acc = out  # unused placeholders when there is one partition
    arrivals = arrival_counts("decode attention", query.device, num_seqs * num_kv_heads)
    if num_partitions > 1:
        part_max = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_partitions, head_dim_pad, dtype=torch.float32,
                               device=query.device)
    group_p2 = triton.next_power_of_2(group)
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_max, part_sum, part_acc, arrivals, query, k_cache, v_cache, block_tables, seq_lens, scale * LOG2E,
        num_partitions, query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache),
        GROUP=group, GROUP_PAD=max(16, group_p2), GROUP_P2=group_p2, BLOCK_SIZE=k_cache.shape[1],
        MERGE_CHUNK=max(1, 64 // group_p2), DOT_PRECISION=_dot_precision(query.dtype), **common,
        window=sliding_window or 0, SLIDING=sliding_window is not None, num_warps=num_warps, num_stages=num_stages,
    )
