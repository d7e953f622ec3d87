"""Dense matrix products on the CPU through oneDNN, with each weight reordered once at load into
the blocked layout oneDNN's kernels read (what vLLM's CPU build and torch.compile's CPU backend
do), instead of `F.linear` reading the plain row-major matrix at every call.

Measured on a 2-core AVX2 EPYC, float32, 2 threads (scripts/cpu_linear_bench.py): the
SmolLM2 LM head (49152 x 576) 16.9 -> 8.9 ms for 1 token and 53 -> 28 ms for 32; an MLP
projection (3072 x 576) 2.64 -> 1.28 ms for 32 tokens; never slower at 1..2048 tokens.
The outputs agree with `F.linear` to float32 rounding (another summation order), not bit for bit.

`pack_model` swaps every dense single-rank `nn.Linear` for a `PackedLinear` (the same memory:
the reordered weight replaces the plain one) and gives the table the model scores logits with a
packed copy (an untied LM head drops its plain table; tied embeddings keep both, since the
lookup reads the plain rows: +113 MB for the bundled SmolLM2 in float32). Only where oneDNN can
reorder the dtype: float32 everywhere, bfloat16 only on CPUs with AVX-512 (BW/VL/DQ) or
AVX-NE-CONVERT. PAGEDLLM_CPU_PACKED_LINEAR=0 keeps `F.linear`. A GGUF's matrices are packed from the
file before its weights load (loader/gguf_packed.py), and pack_model then swaps what is left.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm import envs
from pagedllm.layers.vocab_parallel import logits_table

logger = logging.getLogger("pagedllm")

_BATCH_HINT = 32  # the reorder's row-count hint; any row count runs on the result


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight (N, K) reordered for oneDNN, or None where this CPU and dtype have no such path."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
    except (RuntimeError, AttributeError):
        return None


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ packed weight (N, K)^T + bias -> (..., N)."""
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), weight, bias, "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


class PackedLinear(nn.Module):
    format = "packed"

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        """bias: the replaced layer's own parameter, kept (a loader still to come may fill it)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # oneDNN's layout: not a Parameter, not in state_dict
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)


def packing_enabled(model: nn.Module) -> bool:
    first = next(model.parameters())
    return envs.PAGEDLLM_CPU_PACKED_LINEAR and first.device.type == "cpu" and torch.backends.mkldnn.is_available()


def dense_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers packing would swap: dense `nn.Linear`s whole on this rank."""
    return [
        (name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear) and (getattr(layer, "tp", None) is None or layer.tp.world_size == 1)
    ]


def swap_packed(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace the dense linear layer `name` by a PackedLinear on `weight` (packed), keeping its bias."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, PackedLinear(weight, model.get_submodule(name).bias))


def pack_model(model: nn.Module) -> int:
    """Swap the model's dense linear layers (and its logits table) in place; the number swapped."""
    if not packing_enabled(model):
        return 0
    swapped = 0
    for name, layer in dense_linears(model):
        weight = packed_weight(layer.weight)
        if weight is None:
            return swapped  # this dtype has no packed path here: the rest would fail the same way
        swap_packed(model, name, weight)
        swapped += 1
    head = logits_table(model)
    if head is not None and head.tp.world_size == 1 and head.logits_layer is None:
        weight = packed_weight(head.weight)
        if weight is not None:
            head.logits_layer = PackedLinear(weight, None)
            swapped += 1
            if not getattr(model, "tie_word_embeddings", False):  # scored only through logits(): the copy is enough
                head.weight.data = head.weight.data.new_empty(0, head.weight.shape[1])
    packed = sum(type(m) is PackedLinear for m in model.modules())  # with those packed before loading (loader/gguf_packed.py)
    if packed:
        logger.info("CPU: %d matrices reordered for oneDNN (%s)", packed, str(next(model.parameters()).dtype).removeprefix("torch."))
    return swapped
