"""CUDA graphs for decode-only steps.

A decode step of n sequences runs the graph captured for the smallest padded
batch size >= n. The graph reads its inputs from static buffers, so a replay is:
copy this step's inputs into the first n rows, mark rows n.. as padding (slot
-1: nothing written; context length 1: finite garbage that nobody reads), replay,
take the first n rows of the output.

    static rows:  [ r0 r1 r2 | pad pad pad pad pad ]    n = 3, graph size 8
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata

logger = logging.getLogger("pagedllm")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int, device: str) -> None:
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.int64)
            self.positions = torch.zeros(n, dtype=torch.int64)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.int64)
            self.seq_lens = torch.ones(n, dtype=torch.int32)
            self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            block_tables=self.block_tables[:n],
            num_decodes=n,
            num_decode_tokens=n,
            max_query_len=1,
            max_seq_len=self.max_model_len,  # an upper bound: the graph is fixed
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=[1] * n,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = self._meta(n)
            for _ in range(2):  # warm up (Triton compiles, allocator settles)
                self.model(self.input_ids[:n], self.positions[:n], meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self.model(self.input_ids[:n], self.positions[:n], meta)
            self.graphs[n] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s",
                    len(self.sizes), self.sizes[-1], time.perf_counter() - start)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_prefills == 0 and meta.num_decodes <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_decodes
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
