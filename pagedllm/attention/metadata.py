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
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding tokens (not written)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32
    num_decodes: int
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop over sequences (torch reference).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
