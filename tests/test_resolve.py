"""Model references: one small OPT checkpoint laid out every way a user may have it, all
loading to the same outputs; the resolver's choices on cache layouts; and the errors, which
name every place looked in, come within a second and never open a network connection."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from model_utils import (  # noqa: F401 (fixtures)
    build_checkpoint,
    copy_without_weights,
    make_hf_cache,
    one_thread,
    resave_as_bin,
    tokenizer_dir,
    vocab_size,
)
from transformers import OPTConfig

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.loader.checkpoint import GGUFCheckpoint, GGUFWithHFTokenizer, HFFolderCheckpoint, open_checkpoint
from pagedllm.loader.resolve import ModelNotFoundError, resolve_model, resolve_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ID = "facebook/opt-125m"
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=32, max_num_seqs=8)


@pytest.fixture(autouse=True)
def clean_hf_env(monkeypatch, tmp_path):
    """No test sees the machine's own Hugging Face cache, and none may reach the network."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(self, address, *args):
        raise AssertionError(f"a network connection was opened to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer_dir) -> str:
    """facebook/opt-125m's shape in miniature, as save_pretrained writes it."""
    config = OPTConfig(
        vocab_size=vocab_size(tokenizer_dir), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    return build_checkpoint(config, str(tmp_path_factory.mktemp("plain") / "opt"), tokenizer_dir)


@pytest.fixture(scope="module")
def expected(plain):
    return outputs_of(LLM(plain, **ENGINE))


def outputs_of(llm: LLM) -> list:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


# --------------------------------------------------------------------------- layouts, end to end


def test_hf_cache_reached_as_org_name_offline(plain, expected, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    snapshot = make_hf_cache(plain, str(home / "hub"), REPO_ID)
    monkeypatch.setenv("HF_HOME", str(home))
    llm = LLM(REPO_ID, **ENGINE)
    assert llm.engine.core.runner.config.source == snapshot
    assert llm.engine.core.runner.config.name == REPO_ID
    assert outputs_of(llm) == expected


def test_hf_hub_cache_variable_is_honoured(plain, tmp_path, monkeypatch):
    snapshot = make_hf_cache(plain, str(tmp_path / "elsewhere"), REPO_ID)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_model(REPO_ID).path == snapshot


def test_cache_dir_folder_as_from_pretrained_leaves_it(plain, expected, tmp_path, monkeypatch):
    """from_pretrained("facebook/opt-125m", cache_dir="./opt-125m") then copied to an offline
    machine: both `./opt-125m` and `facebook/opt-125m` with download_dir="./opt-125m" work."""
    snapshot = make_hf_cache(plain, str(tmp_path / "opt-125m"), REPO_ID)
    os.makedirs(tmp_path / "opt-125m" / ".locks")  # huggingface_hub leaves one there
    monkeypatch.chdir(tmp_path)
    llm = LLM("./opt-125m", **ENGINE)
    assert llm.engine.core.runner.config.source == snapshot
    assert outputs_of(llm) == expected
    assert resolve_model(REPO_ID, download_dir="./opt-125m").path == snapshot
    assert resolve_model(str(tmp_path / "opt-125m" / "models--facebook--opt-125m")).path == snapshot


def test_sharded_safetensors_with_index(plain, expected, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(plain).save_pretrained(sharded, max_shard_size="1MB")
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), sharded)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer_config.json"), sharded)
    checkpoint = open_checkpoint(EngineArgs(model=sharded))
    assert len(checkpoint.weight_files) > 1
    assert outputs_of(LLM(sharded, **ENGINE)) == expected


@pytest.mark.parametrize("num_shards", [1, 3])
def test_pytorch_bin_weights(plain, expected, tmp_path, num_shards):
    folder = resave_as_bin(plain, str(tmp_path / "bin"), num_shards)
    assert len(open_checkpoint(EngineArgs(model=folder)).weight_files) == num_shards
    assert outputs_of(LLM(folder, **ENGINE)) == expected


def test_separate_tokenizer_option(plain, expected, tmp_path, monkeypatch, tokenizer_dir):
    """Weights without tokenizer files: the error says to pass tokenizer=; passing it, as a
    folder or as org/name in the cache, works."""
    weights_only = str(tmp_path / "weights-only")
    os.makedirs(weights_only)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(os.path.join(plain, name), weights_only)
    with pytest.raises(FileNotFoundError, match="pass tokenizer="):
        LLM(weights_only, **ENGINE)
    assert outputs_of(LLM(weights_only, tokenizer=tokenizer_dir, **ENGINE)) == expected
    snapshot = make_hf_cache(tokenizer_dir, str(tmp_path / "home" / "hub"), "HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_tokenizer("HuggingFaceTB/SmolLM2-135M") == snapshot
    assert outputs_of(LLM(weights_only, tokenizer="HuggingFaceTB/SmolLM2-135M", **ENGINE)) == expected


# --------------------------------------------------------------------------- the resolver's choices


def fake_model(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        open(os.path.join(folder, name), "w").close()
    return str(folder)


def test_snapshot_choice_and_revision(tmp_path):
    src = fake_model(tmp_path / "src")
    cache = str(tmp_path / "cache")
    a = make_hf_cache(src, cache, REPO_ID, commit="a" * 40, ref="main")
    b = make_hf_cache(src, cache, REPO_ID, commit="b" * 40, ref="v2.0")
    assert resolve_model(REPO_ID, download_dir=cache).path == a  # what refs/main names
    assert resolve_model(REPO_ID, revision="v2.0", download_dir=cache).path == b  # a tag or branch
    assert resolve_model(REPO_ID, revision="b" * 40, download_dir=cache).path == b  # a commit
    assert resolve_model(REPO_ID, revision="bbbbbbb", download_dir=cache).path == b  # a short commit
    with pytest.raises(ModelNotFoundError, match=r"revision 'v3'.*refs: main -> aaaaaaaaaaaa, v2.0 -> bbbbbbbbbbbb"):
        resolve_model(REPO_ID, revision="v3", download_dir=cache)


def test_only_snapshot_without_refs(tmp_path):
    cache = str(tmp_path / "cache")
    only = make_hf_cache(fake_model(tmp_path / "src"), cache, REPO_ID, ref=None)
    assert resolve_model(REPO_ID, download_dir=cache).path == only
    make_hf_cache(fake_model(tmp_path / "src2"), cache, REPO_ID, ref=None)
    with pytest.raises(ModelNotFoundError, match="Pass revision="):
        resolve_model(REPO_ID, download_dir=cache)


def test_download_dir_is_searched_before_the_hf_cache(tmp_path, monkeypatch):
    src = fake_model(tmp_path / "src")
    mine = make_hf_cache(src, str(tmp_path / "mine"), REPO_ID, commit="1" * 40)
    make_hf_cache(src, str(tmp_path / "home" / "hub"), REPO_ID, commit="2" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model(REPO_ID, download_dir=str(tmp_path / "mine")).path == mine
    assert resolve_model(str(tmp_path / "home")).path.endswith("2" * 40)  # an HF_HOME passed as a folder


def test_cache_folder_holding_several_models(tmp_path):
    src = fake_model(tmp_path / "src")
    make_hf_cache(src, str(tmp_path / "cache"), REPO_ID)
    make_hf_cache(src, str(tmp_path / "cache"), "gpt2")
    with pytest.raises(ModelNotFoundError, match=r"several models \(facebook/opt-125m, gpt2\).*--download-dir"):
        resolve_model(str(tmp_path / "cache"))


def test_incomplete_snapshot(tmp_path):
    """AutoTokenizer.from_pretrained(..., cache_dir=...) alone fetches only tokenizer files."""
    src = tmp_path / "src"
    os.makedirs(src)
    open(src / "tokenizer.json", "w").close()
    make_hf_cache(str(src), str(tmp_path / "cache"), REPO_ID)
    with pytest.raises(ModelNotFoundError, match="no config.json.*incomplete"):
        resolve_model(str(tmp_path / "cache"))


def test_gguf_routing(tmp_path):
    bundled = open_checkpoint(EngineArgs())
    assert isinstance(bundled, GGUFCheckpoint) and bundled.name == "SmolLM2-135M-Instruct"
    gguf = open_checkpoint(EngineArgs(model=bundled.path))
    assert type(gguf) is GGUFCheckpoint and gguf.path == bundled.path
    with_tokenizer = open_checkpoint(EngineArgs(model=bundled.path, tokenizer=fake_model(tmp_path / "tok")))
    assert isinstance(with_tokenizer, GGUFWithHFTokenizer)
    folder = tmp_path / "ggufs"
    os.makedirs(folder)
    open(folder / "model-Q4_K_M.gguf", "w").close()
    with pytest.raises(ModelNotFoundError, match="To use a GGUF file, pass its path"):
        resolve_model(str(folder))


def test_plain_folder_and_relative_path(tmp_path, monkeypatch):
    folder = fake_model(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    checkpoint = open_checkpoint(EngineArgs(model="my-model"))
    assert isinstance(checkpoint, HFFolderCheckpoint) and checkpoint.path == folder and checkpoint.name == "my-model"


# --------------------------------------------------------------------------- not found, offline


def test_name_not_in_cache_fails_fast_naming_every_place(tmp_path, monkeypatch):
    """LLM(...) end to end: no network (the fixture fails any connect), under a second."""
    home = tmp_path / "hf-home"
    make_hf_cache(fake_model(tmp_path / "src"), str(home / "hub"), "gpt2")  # a cache with something else
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as e:
        LLM(REPO_ID, download_dir="./downloads", **ENGINE)
    assert time.perf_counter() - start < 1.0
    message = str(e.value)
    assert f"model {REPO_ID!r} not found" in message
    assert str(tmp_path / "facebook" / "opt-125m") in message  # as a local folder
    assert str(tmp_path / "downloads" / "models--facebook--opt-125m") in message  # download_dir
    assert str(home / "hub" / "models--facebook--opt-125m") in message  # the HF cache
    assert "hf download facebook/opt-125m" in message and "copy the folder" in message
    assert "allow_download=True" in message


def test_missing_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no such file or folder") as e:
        resolve_model(str(tmp_path / "nope" / "model.gguf"))
    assert "models--" not in str(e.value)  # a path is not looked up in the cache


def test_download_only_when_asked(plain, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_list_repo_files(repo_id, revision=None):
        return ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, ignore_patterns=None):
        calls.append((repo_id, revision, cache_dir, allow_patterns))
        return make_hf_cache(plain, cache_dir, repo_id)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    downloads = str(tmp_path / "downloads")
    with pytest.raises(ModelNotFoundError):
        resolve_model(REPO_ID, download_dir=downloads)
    assert calls == []
    path = resolve_model(REPO_ID, download_dir=downloads, allow_download=True).path
    assert calls[0][:3] == (REPO_ID, None, downloads)
    assert "*.safetensors" in calls[0][3] and "pytorch_model*.bin" not in calls[0][3]  # one format only
    assert resolve_model(REPO_ID, download_dir=downloads).path == path  # now cached: no second download
    assert len(calls) == 1
