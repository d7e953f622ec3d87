"""Linear layers split over tensor-parallel ranks (Megatron style).

A transformer sublayer pairs them so that it needs one all-reduce:

    x (T, E), whole on every rank
      -> ColumnParallelLinear (qkv, gate_up, fc1): this rank's output rows        (T, out / N)
      -> attention over this rank's heads, or the activation: on the slice alone
      -> RowParallelLinear (o_proj, down, fc2): this rank's input columns          partial (T, E)
      -> all-reduce (sum over ranks), then the bias, once                          (T, E) whole again

Merged projections (q/k/v, gate/up) are split projection by projection, so that every rank
holds its slice of each:

    checkpoint rows:  [ q: heads 0 1 2 3 | k: kv heads 0 1 | v: kv heads 0 1 ]     N = 2, GQA 2:1
    rank 0:           [ q 0 1 | k 0 | v 0 ]          rank 1: [ q 2 3 | k 1 | v 1 ]

Splits fall on unit boundaries: a KV head and the query heads that share it for attention,
one row for an MLP. Units that do not divide by N are split as evenly as they can
(shard_range: 3 KV heads over 2 ranks -> 2 and 1).

Each split parameter carries `weight_loader(param, checkpoint_tensor, shard_id)`, which copies
this rank's slice of the whole checkpoint tensor into it. It takes the slice with `narrow` alone,
so that a lazily read checkpoint tensor (loader/lazy_tensor.py) reads only a
column-parallel rank's rows from the file. With one rank there is no loader and
the checkpoint tensor is the parameter (models/weights.py), as with a plain nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import TensorParallelGroup, get_tp_group, shard_range
from pagedllm.layers.fused import decode_gemv_for
from pagedllm.loader.lazy_tensor import copy_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or for a decode-sized batch on the GPU the Triton GEMV where it reads the
    weight faster than cuBLAS (layers/triton_linear.py)."""
    gemv = decode_gemv_for(x, weight)
    return gemv.linear(x, weight, bias) if gemv is not None else F.linear(x, weight, bias)


def rank_slice(full_size: int, num_units: int | None, rank: int, world_size: int) -> tuple[int, int]:
    """(first row, row count) of rank's slice of a dimension of full_size rows made of
    num_units equal units (None: every row a unit)."""
    units = num_units or full_size
    if full_size % units:
        raise ValueError(f"a dimension of {full_size} does not split into {units} equal units")
    unit = full_size // units
    start, end = shard_range(units, rank, world_size)
    if start == end:
        raise ValueError(
            f"tensor_parallel_size {world_size} is more than the {units} units (heads or rows) of a layer: "
            f"each rank needs at least one; use a tensor_parallel_size of at most {units}"
        )
    return start * unit, (end - start) * unit


class ColumnParallelLinear(nn.Linear):
    """y = x W^T + b with W's rows (the outputs) split over the ranks; y stays split."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, num_units: int | None = None) -> None:
        """output_sizes: each merged projection's whole size (one entry for a plain layer).
        num_units: each projection is that many equal units, never split (the KV heads for
        q/k/v: a q unit is the query heads of one KV head); None: any row."""
        tp = get_tp_group()
        slices = [rank_slice(size, num_units, tp.rank, tp.world_size) for size in output_sizes]
        local_sizes = [rows for _, rows in slices]
        super().__init__(in_features, sum(local_sizes), bias=bias)
        self.tp = tp
        self.full_sizes = list(output_sizes)
        self.local_sizes = local_sizes  # this rank's rows of each projection
        self.slices = slices
        for param in self.parameters():
            if len(output_sizes) > 1:  # loaded projection by projection
                param.shard_sizes = local_sizes
            if tp.world_size > 1:
                param.weight_loader = self._load_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        if shard_id is None and len(self.full_sizes) > 1:  # merged in the checkpoint too (GPT-2's c_attn)
            _check_shape(loaded, (sum(self.full_sizes), *param.shape[1:]), self.tp)
            start = 0
            for i, size in enumerate(self.full_sizes):
                self._load_rows(param, loaded.narrow(0, start, size), i)
                start += size
            return
        i = shard_id or 0
        _check_shape(loaded, (self.full_sizes[i], *param.shape[1:]), self.tp)
        start, rows = self.slices[i]
        copy_rows(param.data.narrow(0, sum(self.local_sizes[:i]), rows), loaded, start)


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W's columns (the inputs) split over the ranks: x arrives split (from a
    ColumnParallelLinear with the same units), the partial products are summed over the ranks,
    and the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, num_units: int | None = None) -> None:
        tp = get_tp_group()
        input_slice = rank_slice(in_features, num_units, tp.rank, tp.world_size)
        super().__init__(input_slice[1], out_features, bias=bias)
        self.tp = tp
        self.input_slice = input_slice  # (first column, count) of this rank's inputs
        self.full_in_features = in_features
        # False: forward returns this rank's partial sum, and the RMSNorm after it sums over the
        # ranks, fused with its residual add (layers/all_reduce_norm.py; only without a bias).
        self.reduce_results = True
        if tp.world_size > 1:
            self.weight.weight_loader = self._load_columns  # the bias is whole on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return linear(x, self.weight, self.bias)
        if not self.reduce_results:
            return linear(x, self.weight)  # (T, out), this rank's partial sum
        y = self.tp.all_reduce(linear(x, self.weight))  # (T, out), summed over ranks
        return y if self.bias is None else y + self.bias

    def _load_columns(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        _check_shape(loaded, (param.shape[0], self.full_in_features), self.tp)
        param.data.copy_(loaded.narrow(1, *self.input_slice))


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...], tp: TensorParallelGroup) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)}, model expects {tuple(expected)} "
            f"(before the split over {tp.world_size} ranks)"
        )
