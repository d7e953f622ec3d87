"""Qwen2 (Qwen2, Qwen2.5): Llama with a bias on the q, k and v projections (none on o_proj).

Data flow and weight names are Llama's (llama.py); only the attention's projections differ.
"""

from __future__ import annotations

from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    def __init__(self, config) -> None:
        super().__init__(config, qkv_bias=True)


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen2Attention
