"""Small random-weight checkpoints for the model and loading tests, in every layout a
user may hand us: a save_pretrained folder, sharded safetensors, pytorch_model*.bin,
a Hugging Face cache (blobs + refs + snapshots) and a from_pretrained(cache_dir=...) folder.

The tokenizer is the bundled SmolLM2 one, converted from its GGUF once per session
(transformers takes ~5 s for that) and saved as an HF tokenizer folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from torch import nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The SmolLM2 tokenizer as an HF folder, made once per session (shared by the test modules
    that import this fixture: the folder under the session's base temp dir is the cache)."""
    folder = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").exists():
        save_smollm2_tokenizer(str(folder))
    return str(folder)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tiny models run fastest on one thread, and torch's spinning intra-op threads slow down
    by 30x on a busy 2-core machine (measured: 0.2 s vs 6.6 s for the same generate)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def vocab_size(tokenizer_folder: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_folder))


def save_smollm2_tokenizer(folder: str) -> int:
    """Write the bundled model's tokenizer to `folder` as HF files; returns its vocab size."""
    from transformers import AutoTokenizer

    from pagedllm.loader.gguf import find_bundled_model

    directory, name = os.path.split(find_bundled_model())
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Weights that exercise every tensor: HF initialises biases to 0 and norms to 1, which
    would let a bias or norm weight that failed to load go unnoticed. Scales keep the logits
    peaked enough that greedy choices are not near-ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1:  # norm weights around 1, biases and norm biases around 0
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif id(p) in embeddings or name.startswith("lm_head"):
            p.copy_(0.5 * noise)
        else:  # Linear (out, in) or GPT-2's Conv1D (in, out): scale by the input width
            fan_in = p.shape[0] if "Conv1D" in type(model.get_submodule(name.rsplit(".", 1)[0])).__name__ else p.shape[1]
            p.copy_(noise / fan_in**0.5)


def build_checkpoint(config, folder: str, tokenizer_folder: str, seed: int = 0, **save_kwargs) -> str:
    """A random-weight HF model from `config`, saved with save_pretrained next to the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(folder, **save_kwargs)
    copy_tokenizer(tokenizer_folder, folder)
    return folder


def copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)


def copy_without_weights(src: str, dst: str) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))


def resave_as_bin(src: str, dst: str, num_shards: int = 1) -> str:
    """The same tensors as pytorch_model.bin (or pytorch_model-0000i-of-0000n.bin shards plus
    pytorch_model.bin.index.json), as older checkpoints such as facebook/opt-125m ship them."""
    from safetensors.torch import load_file

    copy_without_weights(src, dst)
    state = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(src, name)))
    names = list(state)
    if num_shards == 1:
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
        return dst
    weight_map = {}
    for i in range(num_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = names[i::num_shards]
        torch.save({n: state[n] for n in part}, os.path.join(dst, shard))
        weight_map |= {n: shard for n in part}
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


def make_hf_cache(src: str, cache: str, repo_id: str, commit: str | None = None, ref: str | None = "main") -> str:
    """Lay `src` out as huggingface_hub does in a cache folder; returns the snapshot folder.

        <cache>/models--org--name/
            blobs/<sha256>              the file contents
            refs/main                   "<commit>"
            snapshots/<commit>/<file>   -> ../../blobs/<sha256>
    """
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}{src}".encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    if ref is not None:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot
