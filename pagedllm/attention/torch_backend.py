"""Reference attention on the paged cache with torch ops (CPU, and the GPU kernels' check).

Decodes are batched: their K/V are gathered through the block tables into a padded
[num_decodes, max_seq_len] context and masked by length. Prefill chunks are looped
one sequence at a time (causal with an offset: the chunk's queries sit at the end
of the context). The cache may be kept in another dtype than the model's (kv_cache_dtype:
float16 on a float32 CPU model): written rounded to it, read back in the query's.

On the CPU in float32 or bfloat16, where pagedllm's compiled kernels run (layers/cpu_ops.py),
the cache write and every token's attention go through them instead, prefill tokens included: each
query token is one row of the paged kernel, over its own context (its position + 1 tokens,
the blocks read in place, shared by up to 16 rows of a prompt while in cache). So a token's
attention is the same sequence of float operations however its prompt was cut -- one
prefill, chunks, the rest after a prefix-cache hit -- or as a decode step. torch's SDPA is
not: its results move by an ulp with the number of query rows in the call (its matrix
products block by row count), and quantized products (int8 activations) turn an ulp into
another rounding step, so the same request gave other greedy tokens after another request's
prefix hit. The kernel is as fast as SDPA up to ~512-token prompts and ~1.3x its time at 1024
(scripts/cpu_prefill_attention_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.fused import cpu_ops_for


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache[block_tables]: [*tables.shape, block_size, num_kv_heads, head_dim].
    (index_select: advanced indexing on CPU is a thousand times slower here.)"""
    picked = cache.index_select(0, block_tables.reshape(-1).long())
    return picked.view(*block_tables.shape, *cache.shape[1:])


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return gather_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:length]


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False  # it slices by the host lists (seq_lens_cpu), fixed in a graph

    def __init__(self) -> None:
        # What the decodes of one step gather, worked out by the first layer and reused by the
        # others (30 layers in SmolLM2: on CPU a step is mostly per-op overhead). Keyed by the
        # step's metadata object (held, so its id cannot be reused by a later step) and the
        # layer's sliding window (local and global layers interleave in Gemma 3).
        self._plans: dict[int | None, _DecodePlan] = {}
        self._plans_meta: AttentionMetadata | None = None

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        cpu_ops = cpu_ops_for(query)
        if cpu_ops is not None:
            cpu_ops.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
            starts = None if meta.num_decodes == meta.num_seqs else meta.query_start_loc  # (None: one token each)
            return cpu_ops.paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, sliding_window, starts)
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd:
            decoded = self._decode(query[:nd], k_cache, v_cache, meta, scale, self._decode_plan(meta, k_cache.shape[1], sliding_window))
        if meta.num_decodes == meta.num_seqs:  # decodes only: the whole output in one call
            return decoded
        out = torch.empty_like(query)
        if nd:
            out[:nd] = decoded
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            out[start:end] = self._prefill(query[start:end], k_cache, v_cache, meta.block_tables[i], meta.seq_lens_cpu[i],
                                           scale, sliding_window)
        return out

    @staticmethod
    def _prefill(query, k_cache, v_cache, block_table, seq_len: int, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
        q_len = query.shape[0]
        # (Hkv, L, D), in the query's dtype where the cache is kept in another (kv_cache_dtype)
        k = gather_context(k_cache, block_table, seq_len).transpose(0, 1).to(query.dtype)
        v = gather_context(v_cache, block_table, seq_len).transpose(0, 1).to(query.dtype)
        q = query.transpose(0, 1)  # (H, Q, D)
        if q_len == seq_len and sliding_window is None:
            mask = None
            causal = True
        else:  # query i sits at context position seq_len - q_len + i
            pos_q = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
            pos_k = torch.arange(seq_len, device=query.device)[None, :]
            mask = pos_k <= pos_q
            if sliding_window is not None:
                mask &= pos_k > pos_q - sliding_window
            causal = False
        # Batched (4-D): on a CPU, torch's flash kernel; 3-D inputs take its math path, 2-3x slower
        # (9 heads x 136 tokens, GQA 3:1, 2 threads: 1.4 -> 0.7 ms; 256 tokens: 6.6 -> 1.9 ms).
        o = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[0] != k.shape[0]
        )
        return o[0].transpose(0, 1)

    def _decode_plan(self, meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> _DecodePlan:
        if self._plans_meta is not meta:
            self._plans_meta, self._plans = meta, {}
        plan = self._plans.get(sliding_window)
        if plan is None:
            plan = self._plans[sliding_window] = _DecodePlan.build(meta, block_size, sliding_window)
        return plan

    @staticmethod
    def _decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, plan: _DecodePlan | None = None,
                sliding_window: int | None = None) -> torch.Tensor:
        plan = plan or _DecodePlan.build(meta, k_cache.shape[1], sliding_window)
        nd, max_len = plan.slots.shape
        # (slots, Hkv, D) -> (B, L, Hkv, D) -> (B, Hkv, L, D)
        k = k_cache.flatten(0, 1).index_select(0, plan.flat_slots).view(nd, max_len, *k_cache.shape[2:]).transpose(1, 2)
        v = v_cache.flatten(0, 1).index_select(0, plan.flat_slots).view(nd, max_len, *v_cache.shape[2:]).transpose(1, 2)
        k, v = k.to(query.dtype), v.to(query.dtype)
        q = query.unsqueeze(2)  # (B, H, 1, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.squeeze(2)


@dataclass(frozen=True)
class _DecodePlan:
    """The cache slots every decode reads, padded to the longest context, and the mask that
    hides the padding and, in a sliding-window layer, what lies before the window (None when
    all contexts have one length and there is no window, as at batch 1).

        block_tables[b] = [7, 2]  (block_size 4), seq_len 6  ->  slots[b] = 28 29 30 31 8 9
    """

    slots: torch.Tensor  # (B, max_len) int64
    flat_slots: torch.Tensor  # slots.view(-1)
    mask: torch.Tensor | None  # (B, 1, 1, max_len) bool

    @staticmethod
    def build(meta: AttentionMetadata, block_size: int, sliding_window: int | None = None) -> _DecodePlan:
        nd = meta.num_decodes
        lens = meta.seq_lens_cpu[:nd]
        max_len = max(lens)
        max_blocks = (max_len + block_size - 1) // block_size
        device = meta.block_tables.device
        offsets = torch.arange(block_size, device=device)
        slots = (meta.block_tables[:nd, :max_blocks, None].long() * block_size + offsets).flatten(1)[:, :max_len]
        mask = None
        positions = torch.arange(max_len, device=device)[None, :]
        if min(lens) != max_len:
            mask = positions < meta.seq_lens[:nd, None]  # the query sits at seq_len - 1
        if sliding_window is not None and max_len > sliding_window:
            in_window = positions >= meta.seq_lens[:nd, None] - sliding_window
            mask = in_window if mask is None else mask & in_window
        if mask is not None:
            mask = mask[:, None, None, :]
        return _DecodePlan(slots, slots.reshape(-1), mask)
