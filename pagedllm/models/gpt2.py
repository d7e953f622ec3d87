"""GPT-2: learned positions, pre-LN LayerNorm, GELU (tanh) MLP, one fused qkv projection.

Data flow, per token of the flattened step batch (T tokens in all):

    wte[ids] + wpe[positions]  (T, E)
      -> [ x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) ] x L
      -> ln_f -> logits = x @ wte.T  (tied)

    attn: c_attn (T, 3E) -> q, k, v (T, E) each -> paged attention -> c_proj
    mlp:  c_fc (T, n_inner) -> gelu_new -> c_proj (T, E)

HF's GPT-2 is built from Conv1D, which stores a weight as (in, out): c_attn, c_proj and c_fc
are transposed at load into nn.Linear's (out, in). Checkpoints saved from GPT2Model (the
original "gpt2" ones) lack the `transformer.` prefix and carry the causal-mask buffers
`attn.bias` / `attn.masked_bias`, which are not weights and are dropped.

Tensor parallelism (layers/linear.py): heads, the MLP and the vocabulary are split over the
ranks; wpe and the LayerNorms are whole on every rank; the row-parallel c_proj adds its bias
once, after the all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata
from pagedllm.layers.activation import get_activation
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.embedding import LearnedPositionEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.weights import load_stacked_weights

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def hf_to_ours(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names and layouts -> ours: add the `transformer.` prefix where missing, transpose
    Conv1D weights, drop the mask buffers."""
    for name, tensor in weights:
        if name.endswith(MASK_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # (in, out) -> (out, in)
        yield name, tensor


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        E, H = config.hidden_size, config.num_attention_heads
        head_dim = E // H
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        # Tensor parallelism: this rank's heads of q, k and v; c_proj sums over the ranks.
        self.c_attn = ColumnParallelLinear(E, [E, E, E], bias=True, num_units=H)
        self.c_proj = RowParallelLinear(E, E, bias=True, num_units=H)
        num_local_heads = self.c_attn.local_sizes[0] // head_dim
        self.attn = PagedAttention(num_local_heads, num_local_heads, head_dim, scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # each (T, E / N)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, [inner], bias=True)
        self.act = get_activation(config.activation_function)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (T, E)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (an encoder-decoder set-up) is not supported")
        self.config = config
        self.transformer = GPT2Model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states."""
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        head = self.transformer.wte if self.tie_word_embeddings else self.lm_head
        return head.logits(hidden, gather)  # (T, vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_stacked_weights(self, hf_to_ours(weights), stacked=[], skip=skip)
