"""HF `architectures` name -> our implementation. Adding a model is adding a file
and a line here."""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config) -> type[nn.Module]:
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in _MODELS:
            module, cls = _MODELS[name]
            return getattr(importlib.import_module(f"pagedllm.models.{module}"), cls)
    raise ValueError(
        f"model architecture {', '.join(names) or '(none given in config.json)'} is not supported; "
        f"supported architectures: {', '.join(supported_architectures())}"
    )
