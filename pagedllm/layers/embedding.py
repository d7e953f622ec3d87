"""Learned absolute position embeddings (GPT-2, OPT)."""

from __future__ import annotations

import torch
from torch import nn


class LearnedPositionEmbedding(nn.Embedding):
    """Row `position + offset` of a learned table. OPT's table starts 2 rows in
    (offset=2, a fairseq legacy of padding positions); GPT-2's at 0. The weight keeps
    the checkpoint's shape, offset rows included, so it loads as is."""

    def __init__(self, num_positions: int, embedding_dim: int, offset: int = 0) -> None:
        super().__init__(num_positions + offset, embedding_dim)
        self.offset = offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions, 0 = first token of its sequence -> (T, embedding_dim)."""
        return super().forward(positions + self.offset)
