"""The model runner: KV cache tensors, batch preparation, forward and sampling."""
