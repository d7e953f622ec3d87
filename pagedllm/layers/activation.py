"""Activations over merged projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.fused import fused_ops_for


class GatedActivation(nn.Module):
    """x = [gate | up] -> act(gate) * up; one fused kernel where there is one (layers/fused.py)."""

    kernel_name: str

    @staticmethod
    def act(gate: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None:
            return getattr(ops, self.kernel_name)(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


class SiluAndMul(GatedActivation):
    """x = [gate | up] -> silu(gate) * up."""

    kernel_name = "silu_and_mul"
    act = staticmethod(F.silu)


class GeluAndMul(GatedActivation):
    """x = [gate | up] -> gelu(gate, tanh approximation) * up (Gemma's gated MLP)."""

    kernel_name = "gelu_tanh_and_mul"

    @staticmethod
    def act(gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")


# HF `activation_function` / `hidden_act` names -> the elementwise function.
# gelu_new (GPT-2) is the tanh approximation, the same curve torch computes with approximate="tanh".
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def get_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]()
