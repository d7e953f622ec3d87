"""The attention layer models call: holds its layer's slice of the paged KV cache
and hands the work to the configured backend."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        """sliding_window: a query at position p sees keys at positions > p - sliding_window
        (itself and the sliding_window - 1 before it), as transformers' sliding-window layers do."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Bound by the model runner once the cache is allocated (bind_kv_cache).
        self.backend: AttentionBackend | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: (T, H*D), k, v: (T, Hkv*D) -> (T, H*D)."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.view(T, self.num_heads * self.head_dim)


def bind_kv_cache(model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: AttentionBackend) -> None:
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert len(layers) == len(kv_caches), f"{len(layers)} attention layers, {len(kv_caches)} caches"
    for layer, (k_cache, v_cache) in zip(layers, kv_caches):
        layer.k_cache, layer.v_cache, layer.backend = k_cache, v_cache, backend
