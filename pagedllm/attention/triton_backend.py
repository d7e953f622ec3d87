"""Attention on the paged cache with the Triton kernels of triton_kernels.py (GPU).

One step = one cache write, then the split-K decode kernel over the leading decode
tokens and the varlen prefill kernel over the chunks after them:

    tokens: [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]
             decode    | prefill (sequences num_decodes ..)

The decode path reads no device value on the host: its grid comes from num_decodes and
meta.max_seq_len, so it can be captured in a CUDA graph as long as meta.max_seq_len is
the graph's fixed upper bound of the context length (e.g. max_model_len), not the
current step's maximum.
"""

from __future__ import annotations

import torch

from pagedllm.attention import triton_kernels as kernels
from pagedllm.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"
    supports_cuda_graphs = True  # decode reads device tensors and the fixed max_seq_len only

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        kernels.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            assert meta.num_decode_tokens == nd, "the decode kernel takes one query token per sequence"
            kernels.decode_attention(out[:nd], query[:nd], k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     scale, meta.max_seq_len, sliding_window=sliding_window)
        if meta.num_prefills:
            kernels.prefill_attention(out, query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, scale, first_seq=nd, num_seqs=meta.num_prefills,
                                      max_query_len=meta.max_query_len, sliding_window=sliding_window)
        return out
