"""Model loading: checkpoint formats (GGUF, ...) to configs, tokenizers and weights."""
