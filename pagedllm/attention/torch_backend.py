"""Reference attention on the paged cache with torch ops (CPU, and the GPU kernels' check).

Decodes are batched: their K/V are gathered through the block tables into a padded
[num_decodes, max_seq_len] context and masked by length. Prefill chunks are looped
one sequence at a time (causal with an offset: the chunk's queries sit at the end
of the context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


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

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        if meta.num_decodes:
            nd = meta.num_decode_tokens
            out[:nd] = self._decode(query[:nd], k_cache, v_cache, meta, scale, sliding_window)
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            out[start:end] = self._prefill(query[start:end], k_cache, v_cache, meta.block_tables[i], meta.seq_lens_cpu[i],
                                           scale, sliding_window)
        return out

    @staticmethod
    def _prefill(query, k_cache, v_cache, block_table, seq_len: int, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
        q_len = query.shape[0]
        k = gather_context(k_cache, block_table, seq_len).transpose(0, 1)  # (Hkv, L, D)
        v = gather_context(v_cache, block_table, seq_len).transpose(0, 1)
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
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[0] != k.shape[0]
        )
        return o.transpose(0, 1)

    @staticmethod
    def _decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        nd = meta.num_decodes
        block_size = k_cache.shape[1]
        seq_lens = meta.seq_lens[:nd]
        max_len = max(meta.seq_lens_cpu[:nd])
        max_blocks = (max_len + block_size - 1) // block_size
        tables = meta.block_tables[:nd, :max_blocks]
        # (B, blocks, bs, Hkv, D) -> (B, Hkv, L, D)
        k = gather_blocks(k_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)
        v = gather_blocks(v_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)
        positions = torch.arange(max_len, device=query.device)[None, :]
        mask = positions < seq_lens[:, None]  # (B, L); the query sits at seq_len - 1
        if sliding_window is not None:
            mask &= positions >= seq_lens[:, None] - sliding_window
        q = query.unsqueeze(2)  # (B, H, 1, D)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return o.squeeze(2)
