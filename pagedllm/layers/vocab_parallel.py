"""The vocabulary split over tensor-parallel ranks: the token embedding and the LM head.

The vocabulary is padded to a multiple of N and cut into N equal ranges of rows; rank r holds
rows [r * V' / N, (r + 1) * V' / N) of the (V, E) table (the padding rows hold zeros):

    embedding: every rank looks up the ids in its range (zeros for the others), all-reduce -> (T, E)
    logits:    every rank scores its range, (T, V' / N); all-gather -> (T, V'), cut to (T, V)

Every rank ends with the same full logits, so every rank can run the sampler on them. Greedy
steps skip the gather: each rank keeps its range and the ranks exchange only their best
token a row (layers/parallel_sampler.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import get_tp_group
from pagedllm.layers.linear import linear
from pagedllm.loader.lazy_tensor import copy_rows


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        tp = get_tp_group()
        rows = -(-vocab_size // tp.world_size)  # per rank, padding included
        super().__init__(rows, embedding_dim)
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start = min(tp.rank * rows, vocab_size)  # this rank's real rows: [vocab_start, vocab_end)
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        # CPU, one rank: the table in another layout that logits() multiplies with instead (oneDNN's,
        # layers/cpu_packed.py, or GGUF's Q8_0 blocks, loader/quantize.py)
        self.logits_layer: nn.Module | None = None
        if tp.world_size > 1:
            self.weight.weight_loader = self._load_rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, E)."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        elsewhere = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(elsewhere[:, None], 0.0))

    def logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """(T, E) -> (T, V): the table used as the output layer (tied embeddings, the LM head).
        gather=False: this rank's range only, (T, V' / N), its columns past vocab_end padding."""
        if self.logits_layer is not None:
            return self.logits_layer(hidden)
        local = linear(hidden, self.weight)  # (T, V' / N)
        if self.tp.world_size == 1 or not gather:
            return local
        return self.tp.all_gather(local)[:, : self.vocab_size]

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, model expects {(self.vocab_size, param.shape[1])}")
        n = self.vocab_end - self.vocab_start
        copy_rows(param.data[:n], loaded, self.vocab_start)
        param.data[n:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """The untied output layer: a (V, E) table like the embedding's, used only through logits()."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the LM head scores hidden states: call logits(hidden)")


def logits_table(model: nn.Module) -> VocabParallelEmbedding | None:
    """The table whose logits() the model calls: the LM head, or the tied embedding."""
    tables = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    heads = [m for m in tables if isinstance(m, ParallelLMHead)]
    if heads:
        return heads[0]
    return tables[0] if getattr(model, "tie_word_embeddings", False) and tables else None
