"""Attention backends over one paged KV cache layout (see metadata.py)."""

from pagedllm.attention.backend import AttentionBackend, get_attention_backend
from pagedllm.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
