"""Greedy tokens picked from each rank's vocabulary range (layers/parallel_sampler.py), by real
gloo ranks in two processes: the result is torch.argmax over the whole row on every rank,
including ties within a rank and across ranks (the lowest id wins), and the padding columns
past a rank's range are never picked, whatever they hold."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.distributed import TensorParallelGroup
from pagedllm.layers.parallel_sampler import argmax_over_shards

VOCAB, WORLD = 11, 2
ROWS = -(-VOCAB // WORLD)  # 6 ids a rank; rank 1 holds ids 6..10 and one padding column


def full_logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=gen)
    logits[1, [2, 4]] = 9.0  # a tie inside rank 0: id 2
    logits[2, [4, 8]] = 9.0  # a tie across ranks: id 4
    logits[3, [7, 10]] = 9.0  # a tie inside rank 1: id 7
    logits[4] = float("-inf")  # nothing allowed anywhere: id 0, as argmax
    logits[5, 10] = 9.0  # the last real id
    return logits


def _rank(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    tp = TensorParallelGroup(rank, WORLD, dist.group.WORLD)
    start, end = min(rank * ROWS, VOCAB), min((rank + 1) * ROWS, VOCAB)
    local = torch.full((6, ROWS), float("inf"))  # padding columns hold the largest value there is
    local[:, : end - start] = full_logits()[:, start:end]
    torch.save(argmax_over_shards(local, start, end, tp), os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_rank_picks_the_argmax_of_the_whole_row():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD)
        picked = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    want = full_logits().argmax(dim=-1)
    assert want[1:].tolist() == [2, 4, 7, 0, 10]
    for tokens in picked:
        assert tokens.dtype == torch.int64 and torch.equal(tokens, want)
