"""Named workloads and model shapes (../shared/BENCHMARKS.md). Token ids come from
random.Random(seed) exactly as the vLLM peer runner draws them, so every engine
gets the same prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Random-weight models from well-known configs (HF LlamaConfig fields).
MODEL_CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    # Not a speed shape: makes the bench's code paths quick to run on a CPU (tests, smoke runs).
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096,
    ),
}


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def random_prompts(num: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


def throughput(num: int, min_len: int, max_len: int, output_len: int, vocab_size: int) -> Workload:
    prompts = random_prompts(num, min_len, max_len, vocab_size)
    return Workload(f"throughput-{num}x[{min_len},{max_len}]->{output_len}", prompts, [output_len] * num)


def latency(batch_size: int, input_len: int, output_len: int, vocab_size: int) -> Workload:
    rng = random.Random(1)
    prompts = [[rng.randrange(100, vocab_size - 100) for _ in range(input_len)] for _ in range(batch_size)]
    return Workload(f"latency-bs{batch_size}-{input_len}->{output_len}", prompts, [output_len] * batch_size)


def write_config_folder(name: str, root: str) -> str:
    """A folder with just config.json for `load_format="dummy"`."""
    import os

    from transformers import LlamaConfig

    folder = os.path.join(root, name)
    config = LlamaConfig(**MODEL_CONFIGS[name])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    return folder
