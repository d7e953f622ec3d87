"""OPT (facebook/opt-125m ... opt-66b): learned positions, LayerNorm, ReLU MLP, biases throughout.

Data flow, per token of the flattened step batch (T tokens in all):

    embed_tokens (T, Ew) -> project_in? (T, E) -> + embed_positions[position + 2]
      -> [ decoder layer ] x L -> final_layer_norm? -> project_out? (T, Ew) -> logits = x @ embed_tokens.T

    decoder layer, pre-LN (do_layer_norm_before: every size but 350m):
        x = x + out_proj(attn(self_attn_layer_norm(x)))
        x = x + fc2(relu(fc1(final_layer_norm(x))))
    post-LN (opt-350m):
        x = self_attn_layer_norm(x + out_proj(attn(x)))
        x = final_layer_norm(x + fc2(relu(fc1(x))))

Ew = word_embed_proj_dim differs from E = hidden_size only where the config says so (opt-350m:
512 vs 1024); then the embeddings are projected in and the output back out. The position
table starts 2 rows in (fairseq's padding offset): position p reads row p + 2.

Tensor parallelism (layers/linear.py): heads, fc1/fc2 and the vocabulary are split over the
ranks; the position table, the LayerNorms and project_in / project_out are small and whole on
every rank.
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

POSITION_OFFSET = 2

# HF weight names -> ours. Our modules carry HF's names under `decoder.`; q/k/v are merged.
STACKED = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
]


def hf_to_ours(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`model.decoder.x` (saved from OPTForCausalLM) and `decoder.x` (the original checkpoints,
    saved from OPTModel) -> `decoder.x`."""
    for name, tensor in weights:
        yield name.removeprefix("model."), tensor


class OPTAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        E, H = config.hidden_size, config.num_attention_heads
        head_dim = E // H
        # Tensor parallelism: this rank's heads of q, k and v; out_proj sums over the ranks.
        self.qkv_proj = ColumnParallelLinear(E, [E, E, E], bias=config.enable_bias, num_units=H)
        self.out_proj = RowParallelLinear(E, E, bias=config.enable_bias, num_units=H)
        num_local_heads = self.qkv_proj.local_sizes[0] // head_dim
        self.attn = PagedAttention(num_local_heads, num_local_heads, head_dim, head_dim**-0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # each (T, E / N)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        E, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.self_attn_layer_norm = nn.LayerNorm(E, elementwise_affine=affine)
        self.self_attn = OPTAttention(config)
        self.final_layer_norm = nn.LayerNorm(E, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(E, [config.ffn_dim], bias=config.enable_bias)
        self.act = get_activation(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, E, bias=config.enable_bias)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), meta)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, meta))
        return self.final_layer_norm(x + self.mlp(x))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (T, E) -> (T, ffn_dim / N) -> (T, E)


class OPTDecoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        E, Ew = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, Ew)
        self.project_in = nn.Linear(Ew, E, bias=False) if Ew != E else None
        self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, E, offset=POSITION_OFFSET)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (
            nn.LayerNorm(E, elementwise_affine=config.layer_norm_elementwise_affine) if has_final_norm else None
        )
        self.project_out = nn.Linear(E, Ew, bias=False) if Ew != E else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, Ew)
        if self.project_in is not None:
            x = self.project_in(x)  # (T, E)
        x = x + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (T, Ew)
        return x


class OPTForCausalLM(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T,) token ids -> (T, word_embed_proj_dim) final hidden states."""
        return self.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        head = self.decoder.embed_tokens if self.tie_word_embeddings else self.lm_head
        return head.logits(hidden, gather)  # (T, vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_stacked_weights(self, hf_to_ours(weights), STACKED, skip=skip)
