"""Loading HF-named checkpoint tensors into models whose projections are merged."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# (our parameter, HF parameter, shard index): q/k/v -> qkv_proj, gate/up -> gate_up_proj.
StackedMapping = list[tuple[str, str, int]]


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedMapping,
    skip: tuple[str, ...] = (),
) -> None:
    """Copy every checkpoint tensor into its parameter; shards of merged projections
    go into their slice (`param.shard_sizes` gives the slice boundaries).
    Missing or unexpected tensors are an error that names them."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard = name, None
        for ours, theirs, index in stacked:
            if theirs in name:
                target, shard = name.replace(theirs, ours), index
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        with torch.no_grad():
            if shard is None:
                _copy(param.data, tensor, name)
                loaded.add(target)
            else:
                sizes = param.shard_sizes
                start = sum(sizes[:shard])
                _copy(param.data.narrow(0, start, sizes[shard]), tensor, name)
                loaded.add(f"{target}#{shard}")
    expected = set()
    for name, param in params.items():
        sizes = getattr(param, "shard_sizes", None)
        expected |= {f"{name}#{i}" for i in range(len(sizes))} if sizes else {name}
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            + (f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; " if missing else "")
            + (f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}" if unexpected else "")
        )


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src)


def merged_linear(in_features: int, shard_sizes: list[int], bias: bool = False) -> nn.Linear:
    """One Linear computing several projections at once; loaded shard by shard."""
    linear = nn.Linear(in_features, sum(shard_sizes), bias=bias)
    linear.weight.shard_sizes = shard_sizes
    if bias:
        linear.bias.shard_sizes = shard_sizes
    return linear
