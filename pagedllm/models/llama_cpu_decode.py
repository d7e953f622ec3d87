"""A Llama decode step on the CPU as one call into pagedllm's C kernels (layers/cpu_kernels.py):
every decoder layer, for steps where each sequence adds one token.

At batch 1 on a small CPU, the layers' Python-level work -- a dozen module calls, views and
kernel wrappers a layer, ~300 µs -- costs more than their arithmetic (SmolLM2-135M in Q4: ~10 ms
of kernels a token against ~10 ms of Python). `decode_layers` runs the same kernels in the same
order as the layers' forward does on this path, so the outputs are the same numbers.

It applies to a LlamaModel whose layers are all plain Llama layers (RMSNorm, LlamaAttention
without biases, sliding window or q/k norms, SiLU-gated MLP) on one rank, in float32 (the KV
cache float32 or float16), with the four products as pagedllm's Q4 blocks (quantization=gguf
or int4); `build` returns None for anything else, and the layers run as usual.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.cpu_kernels import DecoderLayer, lib
from pagedllm.layers.cpu_ops import cache_type, context_arrays
from pagedllm.layers.fused import cpu_ops_for
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantized_linear import BlockLinear


_CACHE_DTYPES = (torch.float32, torch.float16)  # those of the quantized steps (bfloat16 models take the layers)


class CpuDecodeLayers:
    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        attn = layers[0].self_attn
        self.heads, self.kv_heads, self.dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden = layers[0].input_layernorm.weight.shape[0]
        self.inter = layers[0].mlp.down_proj.in_features
        self.eps = layers[0].input_layernorm.eps
        self.cos_sin = attn.rotary.cos_sin
        self.scale = attn.attn.scale
        self._table: ctypes.Array | None = None  # built at the first step, once the caches are bound
        self._caches: int | None = None

    @staticmethod
    def build(layers: nn.ModuleList, x: torch.Tensor) -> CpuDecodeLayers | None:
        """For these layers and activations, or None if they do not fit (see the module doc)."""
        from pagedllm.models.llama import LlamaAttention  # (llama imports this module)

        ops = cpu_ops_for(x)
        cache = layers[0].self_attn.attn.k_cache if len(layers) else None
        if ops is None or lib() is None or x.dtype != torch.float32 or cache is None or cache.dtype not in _CACHE_DTYPES:
            return None
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            products = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not (
                type(attn) is LlamaAttention and attn.attn.sliding_window is None
                and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
                and type(mlp.act) is SiluAndMul
                and all(type(p) is BlockLinear and p.weight_tiles.bits == 4 and p.bias is None and p.tp is None
                        for p in products)
            ):  # fmt: skip
                return None
        return CpuDecodeLayers(layers)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, hidden) embeddings of a decode-only step -> (last layer's output, residual)."""
        x = x.contiguous().clone()  # written in place
        residual = torch.zeros_like(x)
        positions = positions.long()
        tables, lens = context_arrays(meta.block_tables, meta.seq_lens)
        slots = meta.slot_mapping.long()
        cache = self.layers[0].self_attn.attn.k_cache  # (num_blocks, block_size, kv heads, dim), float32 or float16
        status = lib().decode_layers(
            self._layer_table(), len(self.layers), x.data_ptr(), residual.data_ptr(), x.shape[0], self.hidden,
            self.heads, self.kv_heads, self.dim, self.inter, self.eps, positions.data_ptr(), self.cos_sin.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), cache.shape[1], self.scale,
            cache_type(cache),
        )
        if status:
            raise MemoryError("out of memory for a decode step's activations")
        return x, residual

    def _layer_table(self) -> ctypes.Array:
        caches = self.layers[0].self_attn.attn.k_cache.data_ptr()
        if self._table is None or self._caches != caches:  # the caches are bound after loading
            table = (DecoderLayer * len(self.layers))()
            for entry, layer in zip(table, self.layers):
                attn, mlp = layer.self_attn, layer.mlp
                entry.input_norm = layer.input_layernorm.weight.data_ptr()
                entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
                for name, product in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)):
                    setattr(entry, f"{name}_qs", product.weight_tiles.qs.data_ptr())
                    setattr(entry, f"{name}_dm", product.weight_tiles.scales.data_ptr())
                entry.k_cache, entry.v_cache = attn.attn.k_cache.data_ptr(), attn.attn.v_cache.data_ptr()
            self._table, self._caches = table, caches
        return self._table
