"""The attention backend interface and the registry that picks one."""

from __future__ import annotations

from typing import Protocol

import torch

from pagedllm.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    # Whether a decode step of this backend can be captured in a CUDA graph: it must read
    # only the metadata fields AttentionMetadata marks as graph-safe (device tensors and the
    # fixed bounds), never the host lists, which a replay would see frozen at capture.
    supports_cuda_graphs: bool

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,  # a query at position p sees keys at positions > p - sliding_window
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value into the cache at meta.slot_mapping, then attend."""
        ...


BACKENDS = ("torch", "triton")


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from pagedllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from pagedllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
