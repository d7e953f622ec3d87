"""Llama family (Llama 2/3, SmolLM2, Mistral, TinyLlama): RMSNorm, rotary, GQA, SwiGLU.

Data flow, per token t of the flattened step batch (T tokens in all):
    embed -> [ RMSNorm -> attention (paged) -> + -> RMSNorm -> SwiGLU MLP -> + ] x L -> RMSNorm -> logits

Tensor parallelism (layers/linear.py): each rank holds whole KV heads with their query heads,
a slice of the MLP and of the vocabulary; norms and rotary are whole on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.all_reduce_norm import defer_all_reduces
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import get_rotary_embedding, rope_parameters
from pagedllm.models.llama_cpu_decode import CpuDecodeLayers
from pagedllm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.weights import load_stacked_weights

STACKED = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool = False) -> None:
        """qkv_bias: q/k/v carry a bias even where o_proj does not (Qwen2); `attention_bias`
        in the config puts one on all four (Llama variants, Qwen3). With tensor parallelism the
        module holds this rank's KV heads and the query heads that share them."""
        super().__init__()
        bias = bool(getattr(config, "attention_bias", False))
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        q_size, kv_size = total_heads * self.head_dim, total_kv_heads * self.head_dim
        # Split by KV head: a rank holds whole KV heads, each with its group of query heads.
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias or bias, num_units=total_kv_heads
        )
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, bias=bias, num_units=total_kv_heads)
        self.q_size, self.kv_size, _ = self.qkv_proj.local_sizes  # this rank's
        self.num_heads = self.q_size // self.head_dim
        self.num_kv_heads = self.kv_size // self.head_dim
        theta, scaling = rope_parameters(config)
        self.rotary = get_rotary_embedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary(positions, q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config, act: nn.Module | None = None) -> None:
        """act: the gated activation (SiLU by default; Gemma's GELU)."""
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.act = act if act is not None else SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attention_class: type[nn.Module] = LlamaAttention) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_class(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attention_class: type[nn.Module] = LlamaAttention) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention_class) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._cpu_decode: CpuDecodeLayers | bool | None = None
        self._all_reduces_deferred: bool | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # (T, hidden)
        if self._cpu_decode is None:  # decided at the first step: whether the layers fit (llama_cpu_decode.py)
            self._cpu_decode = CpuDecodeLayers.build(self.layers, x) or False
        if self._all_reduces_deferred is None:  # at the first step, once quantization has swapped its layers
            self._all_reduces_deferred = defer_all_reduces(self._sublayer_boundaries())
        if self._cpu_decode and meta.num_decodes == meta.num_seqs:
            x, residual = self._cpu_decode(positions, x, meta)
        else:
            for layer in self.layers:
                x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def _sublayer_boundaries(self) -> list[tuple[nn.Module, nn.Module]]:
        """(a sublayer's row-parallel output layer, the norm its output meets next), in data-flow order."""
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        return [
            pair
            for layer, next_norm in zip(self.layers, next_norms)
            for pair in ((layer.self_attn.o_proj, layer.post_attention_layernorm), (layer.mlp.down_proj, next_norm))
        ]


class LlamaForCausalLM(nn.Module):
    # The one thing the Llama-shaped families change (qwen2.py, qwen3.py); the rest is shared.
    attention_class: type[nn.Module] = LlamaAttention
    stacked_weights = STACKED  # which checkpoint matrices make up a merged layer (loader/quantize.py)

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention_class)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """(T, hidden) -> (T, vocab); gather=False: this rank's vocabulary range (layers/vocab_parallel.py)."""
        head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
        return head.logits(hidden, gather)  # (T, vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tie_word_embeddings else ())
        load_stacked_weights(self, weights, STACKED, skip=skip)
