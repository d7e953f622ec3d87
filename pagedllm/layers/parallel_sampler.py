"""Sampling under tensor parallelism. Each rank appends the sampled token to its copy of the
request, and that copy is the next step's input: the ranks must agree on it exactly.

RankZeroSampler: every rank holds the same full logits (the LM head all-gathers them) and runs
the same sampler, but the tokens all ranks keep are rank 0's. Greedy picks agree anyway; a
random draw agrees only if it comes from one place, so rank 0's tokens are broadcast (B int64s
a step).

argmax_over_shards: a step whose rows all take the plain argmax (greedy, nothing masked, biased
or penalised, no logprobs) needs no full logits. Each rank finds the best token of its own
vocabulary range, and one small all-reduce gives every rank every rank's (logit, token id):

    rank 0, ids [0, 64128):       (12.5, 4711)  ->  pairs [[12.5, 4711], [13.0, 90001]]
    rank 1, ids [64128, 128256):  (13.0, 90001) ->  every rank picks 90001

Every rank picks the same winner from the same pairs, the largest logit and among equal ones
the lowest id, which is argmax over the whole row. At TP=2 on llama-8b's vocabulary this
replaces a 64 x 128,256 all-gather, two copies of it and a broadcast with an (B, 2, 2) sum.
"""

from __future__ import annotations

import torch

from pagedllm.distributed import TensorParallelGroup
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch

# Token ids travel as float32 beside their logits: exact below 2^24. A larger vocabulary takes
# the full logits (the runner checks).
MAX_SHARDED_VOCAB = 1 << 24


class RankZeroSampler:
    def __init__(self, sampler: Sampler, tp: TensorParallelGroup) -> None:
        self.sampler = sampler
        self.tp = tp

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        output = self.sampler(logits, batch)
        sampled = self.tp.broadcast(output.sampled_token_ids.contiguous(), src=0)
        return SamplerOutput(sampled, output.logprobs)  # logprobs: only rank 0's are returned


def argmax_over_shards(local: torch.Tensor, vocab_start: int, vocab_end: int, tp: TensorParallelGroup) -> torch.Tensor:
    """(B,) int64 greedy tokens from this rank's logits (B, n) of ids [vocab_start, vocab_end)
    (columns past vocab_end - vocab_start are padding); the same on every rank."""
    assert vocab_end <= MAX_SHARDED_VOCAB, f"ids up to {vocab_end} do not fit float32 exactly"
    B, n = local.shape[0], vocab_end - vocab_start
    pairs = torch.zeros(B, tp.world_size, 2, dtype=torch.float32, device=local.device)
    if n > 0:
        values, ids = local[:, :n].max(dim=-1)  # the first of equal maxima, as argmax
        pairs[:, tp.rank, 0] = values.float()
        pairs[:, tp.rank, 1] = (ids + vocab_start).float()
    else:  # a rank whose range is all padding (a vocabulary smaller than ranks x rows a rank)
        pairs[:, tp.rank, 0] = float("-inf")
    pairs = tp.all_reduce(pairs)  # every other rank's slots are zeros: the sum copies them
    best_rank = pairs[:, :, 0].argmax(dim=-1, keepdim=True)  # the lowest rank, so the lowest id, of equals
    return pairs[:, :, 1].gather(1, best_rank).squeeze(1).long()
