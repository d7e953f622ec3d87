"""What the attention backends need to know about one forward step.

The tokens of a step are flattened into one batch, sequence by sequence. Decode
sequences (one new token each) come first, then prefill chunks:

    tokens:      [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]
    query_start_loc: 0  1  2  3            7      9
    num_decodes = 3, num_decode_tokens = 3

Sequence i attends to its first seq_lens[i] cached tokens; its queries are the
last (query_start_loc[i+1] - query_start_loc[i]) of those, causally. The K/V of
the new tokens are written to the paged cache *before* attention reads it, so a
backend only ever reads K/V from the cache.

Paged layout, per layer (the same for every backend):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    block_tables[i] = [7, 2, 9]   (block_size = 4)
    token t of sequence i lives at  block_tables[i][t // 4], offset t % 4
    slot_mapping[token] = block * block_size + offset  (flat slot it is written to)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Under a CUDA graph (decode steps, see worker/cuda_graphs.py) a backend may read the
    device tensors (their contents change between replays), num_decodes / num_decode_tokens
    (fixed per graph) and max_seq_len (then a fixed upper bound, max_model_len), and nothing
    else: the host lists and max_query_len would be frozen at their capture-time values.
    Backends that read them say supports_cuda_graphs = False."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding tokens (not written)       graph-safe
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32                                       graph-safe
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step                  graph-safe
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32                              graph-safe
    num_decodes: int  # graph-safe (one graph per padded batch size)
    num_decode_tokens: int  # graph-safe
    max_query_len: int
    max_seq_len: int  # graph-safe as an upper bound only
    # Host copies, for backends that loop over sequences (torch reference). Not graph-safe.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
