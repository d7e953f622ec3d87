"""A checkpoint on disk, whatever its format: config, tokenizer and a stream of
HF-named weight tensors, read one at a time so two copies never coexist."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from pagedllm.config import EngineArgs


class Checkpoint:
    name: str
    source: str
    hf_config: Any
    num_tensors: int | None = None

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def max_position_embeddings(self) -> int:
        c = self.hf_config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048

    def eos_token_ids(self, tokenizer) -> set[int]:
        ids = getattr(self.hf_config, "eos_token_id", None)
        ids = set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return ids


@dataclass
class GGUFCheckpoint(Checkpoint):
    path: str
    name: str

    @cached_property
    def _meta(self):
        from pagedllm.loader.gguf import load_gguf_config_and_tokenizer

        return load_gguf_config_and_tokenizer(self.path)

    @property
    def source(self) -> str:
        return self.path

    @property
    def hf_config(self):
        return self._meta.config

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from pagedllm.loader.gguf import iter_gguf_weights

        return iter_gguf_weights(self.path, dtype)

    def tokenizer(self):
        return self._meta.tokenizer


@dataclass
class HFFolderCheckpoint(Checkpoint):
    """A folder as `save_pretrained` writes it: config.json, *.safetensors or pytorch_model*.bin."""

    path: str
    name: str
    tokenizer_path: str | None = None
    trust_remote_code: bool = False

    @property
    def source(self) -> str:
        return self.path

    @cached_property
    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    @cached_property
    def weight_files(self) -> list[str]:
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            files = sorted(f for f in os.listdir(self.path) if f.startswith("pytorch_model") and f.endswith(".bin"))
        index = [f for f in os.listdir(self.path) if f.endswith(".index.json")]
        if index:  # only the shards the index names (a folder may hold stray files)
            with open(os.path.join(self.path, index[0])) as f:
                named = set(json.load(f)["weight_map"].values())
            files = [f for f in files if f in named]
        if not files:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {self.path}")
        return [os.path.join(self.path, f) for f in files]

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.weight_files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()
                del state

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path or self.path, trust_remote_code=self.trust_remote_code)

    def eos_token_ids(self, tokenizer) -> set[int]:
        ids = super().eos_token_ids(tokenizer)
        gen_config = os.path.join(self.path, "generation_config.json")
        if os.path.exists(gen_config):
            with open(gen_config) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        return ids


BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


def open_checkpoint(args: EngineArgs) -> Checkpoint:
    if args.model is None:
        from pagedllm.loader.gguf import find_bundled_model

        return GGUFCheckpoint(find_bundled_model(), BUNDLED_MODEL_NAME)
    ref = os.path.expanduser(args.model)
    if ref.endswith(".gguf") and os.path.isfile(ref):
        return GGUFCheckpoint(os.path.abspath(ref), os.path.basename(ref).removesuffix(".gguf"))
    if os.path.isfile(os.path.join(ref, "config.json")):
        return HFFolderCheckpoint(os.path.abspath(ref), args.model, args.tokenizer, args.trust_remote_code)
    raise FileNotFoundError(
        f"model {args.model!r} not found: pass a folder holding config.json and weights, or a .gguf file"
    )
