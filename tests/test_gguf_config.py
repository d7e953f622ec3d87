"""A GGUF's config without transformers' per-architecture class: every field pagedllm reads holds what
the class (LlamaConfig, Qwen2Config, ...) gives for the same file, with the file saying everything
and with it silent on all it may leave out."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import ModelConfig
from pagedllm.distributed import SINGLE_RANK, building_for
from pagedllm.loader.checkpoint import Checkpoint
from pagedllm.loader.gguf import ARCHITECTURES, GGUFHeader, TensorInfo, build_config, transformers_config
from pagedllm.loader.model_loader import resolve_dtype
from pagedllm.models import get_model_class

MISSING = object()
# Every key a file may carry, with values unlike every class's defaults (32 heads: Qwen2Config takes 32 KV
# heads where the file does not say, a model of fewer heads could not be built).
FULL = {
    "vocab_size": 512, "context_length": 4096, "embedding_length": 256, "feed_forward_length": 640,
    "block_count": 13, "attention.head_count": 32, "attention.head_count_kv": 4,
    "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 500000.0, "rope.dimension_count": 32,
    "attention.key_length": 48, "attention.sliding_window": 1024,
}  # fmt: skip
REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
TOKEN_IDS = {"tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 6, "tokenizer.ggml.padding_token_id": 7}


def _header(architecture: str, keys: tuple[str, ...], token_ids: bool, tied: bool) -> GGUFHeader:
    arch = ARCHITECTURES[architecture]
    metadata = {f"{architecture}.{key}": FULL[key] for key in keys if key in arch.config_keys}
    metadata |= {"general.architecture": architecture, "tokenizer.ggml.tokens": [f"t{i}" for i in range(300)]}
    metadata |= TOKEN_IDS if token_ids else {}
    tensors = () if tied else (TensorInfo("output.weight", (300, 256), 0, 0, 0),)
    return GGUFHeader(f"{architecture}.gguf", metadata, tensors)


class _Recording:
    """A config that notes every attribute asked of it."""

    def __init__(self, config) -> None:
        self.config, self.read = config, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self.config, name)


class _Checkpoint(Checkpoint):
    def __init__(self, hf_config) -> None:
        self.hf_config = hf_config


def _fields_read(config) -> set[str]:
    """The fields pagedllm reads of `config`: the model class built from it, ModelConfig, the checkpoint."""
    recording = _Recording(config)
    with torch.device("meta"), building_for(SINGLE_RANK):
        get_model_class(recording)(recording)
    model_config = ModelConfig("m", "m", recording, torch.float32, "cpu", 2048)
    _ = model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, model_config.vocab_size
    checkpoint = _Checkpoint(recording)
    _ = checkpoint.max_position_embeddings, checkpoint.eos_token_ids(None)
    resolve_dtype("auto", recording, "cuda")
    return recording.read


CASES = [
    pytest.param(architecture, keys, token_ids, tied, id=f"{architecture}-{name}")
    for architecture in ARCHITECTURES
    for name, keys, token_ids, tied in [("full", tuple(FULL), True, False), ("sparse", REQUIRED, False, True)]
]


@pytest.mark.parametrize("architecture,keys,token_ids,tied", CASES)
def test_fields_pagedllm_reads_match_the_transformers_class(architecture, keys, token_ids, tied):
    header = _header(architecture, keys, token_ids, tied)
    ours, theirs = build_config(header), transformers_config(header)
    assert type(theirs).__name__ == ARCHITECTURES[architecture].config_class
    read = _fields_read(ours) | _fields_read(theirs)
    assert {"hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps", "max_position_embeddings"} <= read
    assert "rope_parameters" in read or architecture == "gemma3" and "layer_types" in read
    for field in sorted(read | {"model_type"}):
        assert getattr(ours, field, MISSING) == getattr(theirs, field, MISSING), field
    for field in ours.to_dict():  # and whatever else ours holds
        if field != "model_type":  # to_dict writes the class's, "" for the plain config
            assert getattr(ours, field) == getattr(theirs, field, MISSING), field


def test_a_file_without_a_required_hyperparameter_is_refused():
    header = _header("llama", ("embedding_length", "block_count", "attention.head_count"), True, True)
    with pytest.raises(ValueError, match="llama.feed_forward_length"):
        build_config(header)


def test_building_the_config_imports_no_config_class():
    """The per-architecture config modules import torch.distributed.tensor and sympy (~1.7 s of start-up)."""
    import subprocess
    import sys

    code = (
        "import sys; from pagedllm.loader.gguf import build_config, read_gguf_header, find_bundled_model;"
        "build_config(read_gguf_header(find_bundled_model()));"
        "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'sympy', 'torch.distributed.tensor'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
