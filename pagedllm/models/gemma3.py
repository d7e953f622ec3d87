"""Gemma 3 (text, `Gemma3ForCausalLM`): Llama's skeleton with Gemma's choices.

Data flow, per token of the flattened step batch (T tokens in all):

    embed(ids) * sqrt(hidden)                                       (T, E)
      -> [ x = x + post_attention_norm(attn(input_norm(x)))
           x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x))) ] x L
      -> norm -> logits = x @ embed.T (tied) -> tanh soft-cap (final_logit_softcapping, if set)

    attn: q, k, v -> q_norm(q), k_norm(k) per head -> rotary -> paged attention (scale
          query_pre_attn_scalar ** -0.5) -> o_proj
    mlp:  gelu_tanh(gate) * up -> down                              (GeGLU)

Every norm is Gemma's RMSNorm, scaling by (1 + w). Layers are local or global by
`config.layer_types`: a "sliding_attention" layer sees the last `sliding_window` positions and
rotates with its own base (10k), a "full_attention" layer sees everything (base 1M, scaled
on the larger models).

Weight names are transformers' (Gemma3ForCausalLM, `model.` prefix); q/k/v and gate/up are merged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata
from pagedllm.layers.activation import GeluAndMul
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.norm import GemmaRMSNorm
from pagedllm.layers.rotary import get_rotary_embedding
from pagedllm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.llama import STACKED, LlamaMLP
from pagedllm.models.weights import load_stacked_weights


def rope_for(config, layer_type: str) -> tuple[float, dict | None]:
    """(theta, scaling or None) of a layer type: transformers 5 keeps one rope dict per layer type,
    transformers 4 configs a global rope_theta / rope_scaling and rope_local_base_freq."""
    params = (getattr(config, "rope_parameters", None) or {}).get(layer_type)
    if params is None:
        local = layer_type == "sliding_attention"
        theta = getattr(config, "rope_local_base_freq", 10000.0) if local else getattr(config, "rope_theta", 1e6)
        params = {"rope_theta": theta, **({} if local else (getattr(config, "rope_scaling", None) or {}))}
    scaled = params.get("rope_type", params.get("type", "default")) not in ("default", None)
    return params["rope_theta"], (params if scaled else None)


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = total_heads * self.head_dim, total_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias, num_units=total_kv_heads)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, bias=bias, num_units=total_kv_heads)
        self.q_size, self.kv_size, _ = self.qkv_proj.local_sizes
        self.num_heads, self.num_kv_heads = self.q_size // self.head_dim, self.kv_size // self.head_dim
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = get_rotary_embedding(self.head_dim, config.max_position_embeddings, *rope_for(config, layer_type))
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, config.query_pre_attn_scalar**-0.5, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim))  # (T, H, D)
        k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim))  # (T, Hkv, D)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, meta))


class Gemma3MLP(LlamaMLP):
    """Llama's gated MLP with GELU (tanh) in place of SiLU."""

    def __init__(self, config) -> None:
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma 3 with hidden_activation {config.hidden_activation!r} is not supported (gelu_pytorch_tanh is)")
        super().__init__(config, act=GeluAndMul())


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        E, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(E, eps)
        self.self_attn = Gemma3Attention(config, layer_type)
        self.post_attention_layernorm = GemmaRMSNorm(E, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(E, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(E, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, kind) for kind in config.layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, E)
        # The scale rounded to the compute dtype first, as transformers multiplies by it.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    honours_sliding_window = True  # its local layers pass the window to attention: no cap on max_model_len

    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("Gemma 3 with attn_logit_softcapping is not supported (Gemma 3 checkpoints leave it unset)")
        self.config = config
        self.model = Gemma3Model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
        logits = head.logits(hidden, gather)  # (T, vocab)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tie_word_embeddings else ())
        load_stacked_weights(self, weights, STACKED, skip=skip)
