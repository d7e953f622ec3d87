"""The CPU's dense path on a GGUF file: each linear layer's matrix dequantized from the mapped file and
reordered for oneDNN (layers/cpu_packed.py) before the weights load; the loader then skips its tensors.

Loading first and packing after wrote each matrix into a fresh float tensor (every page faulted in),
copied q/k/v and gate/up into their merged parameter, and read it all back from memory for the
reorder. Here the parts of one layer's matrix are dequantized into one scratch buffer, which every
layer reuses (its pages faulted in once, its contents still in the cache when the reorder reads them),
and the float matrices never exist as parameters. The values and the reorder are the same, so the
packed weights and every product are bit-identical to packing after loading.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.cpu_packed import dense_linears, packed_weight, packing_enabled, swap_packed
from pagedllm.loader.gguf import GGUFHeader, architecture_of, map_file, permuted_heads, read_tensor
from pagedllm.models.weights import stacked_parts


def pack_before_loading(model: nn.Module, header: GGUFHeader, dtype: torch.dtype) -> set[str]:
    """Swap the dense linear layers of a model built but not yet loaded for packed ones read from the
    file. Returns the (transformers) names of the tensors they took, for the loader to skip. Layers whose
    parts the file does not hold in the layer's shape are left to the loader, and to pack_model after it."""
    if not packing_enabled(model):
        return set()
    arch, heads = architecture_of(header), permuted_heads(header)
    stored = {arch.hf_name(info.name): info for info in header.tensors}
    stacked = getattr(type(model), "stacked_weights", [])
    data = map_file(header.path)
    scratch = torch.empty(0, dtype=dtype)
    taken: set[str] = set()
    for name, layer in dense_linears(model):
        part_names = stacked_parts(name, stacked)
        parts = [stored.get(p) for p in part_names]
        if any(p is None or len(p.shape) != 2 or p.shape[1] != layer.in_features for p in parts) or sum(
            p.shape[0] for p in parts
        ) != layer.out_features:
            continue  # the loader reads what there is, and names what does not fit
        if scratch.numel() < layer.weight.numel():
            scratch = torch.empty(layer.weight.numel(), dtype=dtype)
        weight = scratch[: layer.weight.numel()].view(layer.weight.shape)  # (N, K): the parts' rows stacked
        for part, rows in zip(parts, weight.split([p.shape[0] for p in parts])):
            read_tensor(data, part, dtype, heads.get(part.name.split(".")[-2]), out=rows)
        packed = packed_weight(weight)
        if packed is None:
            return taken  # this dtype has no packed path here: the rest would fail the same way
        swap_packed(model, name, packed)
        taken.update(part_names)
    return taken
