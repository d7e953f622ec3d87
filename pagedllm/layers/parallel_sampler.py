"""Sampling under tensor parallelism: every rank holds the same full logits (the LM head
all-gathers them) and runs the same sampler, but the tokens all ranks keep are rank 0's.

Each rank appends the sampled token to its copy of the request, and that copy is the next
step's input: the ranks must agree on it exactly. Greedy picks agree anyway; a random draw
agrees only if it comes from one place, so rank 0's tokens are broadcast (B int64s a step).
"""

from __future__ import annotations

import torch

from pagedllm.distributed import TensorParallelGroup
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch


class RankZeroSampler:
    def __init__(self, sampler: Sampler, tp: TensorParallelGroup) -> None:
        self.sampler = sampler
        self.tp = tp

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        output = self.sampler(logits, batch)
        sampled = self.tp.broadcast(output.sampled_token_ids.contiguous(), src=0)
        return SamplerOutput(sampled, output.logprobs)  # logprobs: only rank 0's are returned
