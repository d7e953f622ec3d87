"""RMSNorm, with the residual add fused in: one call per sublayer boundary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.fused import fused_ops_for

if TYPE_CHECKING:
    from pagedllm.layers.all_reduce_norm import DeferredAllReduce


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # Set when x arrives as this rank's partial sum, its all-reduce left to this norm
        # (layers/all_reduce_norm.py); always with a residual.
        self.deferred_all_reduce: DeferredAllReduce | None = None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # One call instead of six: torch's composite does the same float32 arithmetic in
            # C++ (bit-identical); on CPU the per-op Python overhead is most of the cost.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        deferred = self.deferred_all_reduce
        if deferred is not None:  # sum x over the ranks first: in the same kernel where it can
            fused = deferred.tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps, deferred.half)
            if fused is not None:
                return fused
            x = deferred.tp.all_reduce(x)
        # One fused kernel (CUDA, CPU float32); not for a subclass whose _norm computes something else.
        ops = fused_ops_for(x)
        if ops is not None and type(self)._norm is RMSNorm._norm:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1, so it scales by (1 + w),
    in float32 as transformers computes it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
