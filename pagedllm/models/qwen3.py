"""Qwen3 (dense): Llama with an RMSNorm over each head's q and k before rotary, and a
head_dim that the config sets on its own (heads x head_dim need not equal hidden_size).

    x -> qkv_proj -> q (T, H, D), k (T, Hkv, D), v -> q_norm(q), k_norm(k) -> rotary -> paged attention -> o_proj

Weight names are Llama's plus `self_attn.q_norm.weight` and `self_attn.k_norm.weight` (each (D,)).
"""

from __future__ import annotations

import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.layers.norm import RMSNorm
from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config) -> None:
        super().__init__(config)  # head_dim from the config; biases where attention_bias says
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim))  # (T, H, D), normed over D
        k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim))  # (T, Hkv, D)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, meta))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
