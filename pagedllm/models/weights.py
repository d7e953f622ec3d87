"""Loading HF-named checkpoint tensors into models whose projections are merged."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.loader.lazy_tensor import CheckpointTensor, copy_rows

# (our parameter, HF parameter, shard index): q/k/v -> qkv_proj, gate/up -> gate_up_proj.
StackedMapping = list[tuple[str, str, int]]


def stacked_parts(layer_name: str, stacked: StackedMapping) -> list[str]:
    """The checkpoint's (HF) weight names whose rows make up our layer's weight, in order."""
    parent, _, leaf = layer_name.rpartition(".")
    parts = sorted((index, theirs) for ours, theirs, index in stacked if ours == leaf)
    names = [f"{parent}.{theirs}" for _, theirs in parts] if parts else [layer_name]
    return [f"{n}.weight" for n in names]


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedMapping,
    skip: tuple[str, ...] = (),
) -> None:
    """Copy every checkpoint tensor into its parameter; shards of merged projections
    go into their slice (`param.shard_sizes` gives the slice boundaries). A tensor may also be a
    loader/lazy_tensor.py CheckpointTensor: a tensor-parallel layer's weight_loader reads its
    slice of it, a shard of a merged projection is read straight into its slice, and any other
    parameter takes it read whole.
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
        weight_loader = getattr(param, "weight_loader", None)  # set by tensor-parallel layers (N > 1)
        if weight_loader is None and shard is None and not isinstance(tensor, torch.Tensor):
            tensor = tensor.read()  # unread (loader/lazy_tensor.py): whole, then adopted by the parameter
        with torch.no_grad():
            if weight_loader is not None:  # the layer copies out this rank's slice
                try:
                    weight_loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"tensor {name}: {e}") from None
            elif shard is None:
                _load(param, tensor, name)
            else:
                sizes = param.shard_sizes
                start = sum(sizes[:shard])
                _copy(param.data.narrow(0, start, sizes[shard]), tensor, name)
        loaded.add(target if shard is None else f"{target}#{shard}")
    expected = set()
    for name, param in params.items():
        sizes = getattr(param, "shard_sizes", None)
        expected |= {f"{name}#{i}" for i in range(len(sizes))} if sizes else {name}
    # A merged parameter may also come whole (GPT-2's c_attn): that covers all its shards.
    missing = sorted(e for e in expected - loaded if e.split("#")[0] not in loaded)
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            + (f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; " if missing else "")
            + (f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}" if unexpected else "")
        )


def _load(param: nn.Parameter, src: torch.Tensor, name: str) -> None:
    """Adopt the loader's tensor as the parameter's storage where it matches exactly, else copy
    into it. Adopting skips a second pass over the weights: the parameter's own allocation was
    never touched (built under _no_init) and is freed; loading a 1B model on CPU takes half the time."""
    if src.shape == param.shape and src.dtype == param.dtype and src.device == param.device and src.is_contiguous():
        param.data = src
    else:
        _copy(param.data, src, name)


def _copy(dst: torch.Tensor, src: torch.Tensor | CheckpointTensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    copy_rows(dst, src)
