"""Model implementations on the paged KV cache, registered by HF architecture name."""

from pagedllm.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "supported_architectures"]
