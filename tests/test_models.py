"""Every supported architecture against HF transformers, on small random-weight checkpoints.

Each case builds a model with transformers from its config class (2 layers, hidden 64, the
SmolLM2 tokenizer's vocab), saves it as an HF folder, loads it in pagedllm and compares greedy
tokens and logprobs on the same prompts: pagedllm runs them as one batch with a small token
budget (chunked prefill across KV blocks), HF one prompt at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from model_utils import build_checkpoint, one_thread, tokenizer_dir, vocab_size  # noqa: F401 (fixtures)
from reference import check_logprobs_close, hf_greedy
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.loader.checkpoint import open_checkpoint
from pagedllm.loader.model_loader import resolve_dtype
from pagedllm.models import get_model_class, supported_architectures

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with "
    "the ends of worms and an oozy smell",  # ~35 tokens: spans KV blocks and prefill chunks
    "1 2 3",
]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=32, max_num_seqs=8)
IDS = dict(eos_token_id=2, bos_token_id=1, pad_token_id=0)
LLAMA_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, **IDS,
)
OPT_SHAPE = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, **IDS)

# case -> (config given the vocab size, our class)
CASES = {
    "llama": (lambda v: LlamaConfig(vocab_size=v, tie_word_embeddings=True, **LLAMA_SHAPE), "LlamaForCausalLM"),
    "mistral": (
        lambda v: MistralConfig(vocab_size=v, tie_word_embeddings=False, sliding_window=4096, **LLAMA_SHAPE),
        "LlamaForCausalLM",
    ),
    "qwen2": (lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=True, **LLAMA_SHAPE), "Qwen2ForCausalLM"),
    # head_dim set apart from hidden / heads (4 x 32 = 128 != 64), as Qwen3 configs do
    "qwen3": (
        lambda v: Qwen3Config(vocab_size=v, head_dim=32, tie_word_embeddings=False, **LLAMA_SHAPE),
        "Qwen3ForCausalLM",
    ),
    "opt": (lambda v: OPTConfig(vocab_size=v, **OPT_SHAPE), "OPTForCausalLM"),  # opt-125m: pre-LN
    # opt-350m: post-LN, embeddings narrower than the model (project_in / project_out)
    "opt-350m-style": (
        lambda v: OPTConfig(vocab_size=v, word_embed_proj_dim=32, do_layer_norm_before=False, **OPT_SHAPE),
        "OPTForCausalLM",
    ),
    # A window of 8 that the ~35-token prompt outgrows (in prefill chunks and in decode), local and
    # global layers with their own rope bases, head_dim != hidden / heads, logits soft-capped.
    "gemma3": (
        lambda v: Gemma3TextConfig(
            vocab_size=v, head_dim=32, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
            **{**LLAMA_SHAPE, "num_hidden_layers": 3},
        ),
        "Gemma3ForCausalLM",
    ),
    "gpt2": (lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256, **IDS), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> int:
    return vocab_size(tokenizer_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir, vocab):
    """case -> checkpoint folder, built on first use."""
    built: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in built:
            folder = str(tmp_path_factory.mktemp(case))
            built[case] = build_checkpoint(CASES[case][0](vocab), folder, tokenizer_dir)
        return built[case]

    return get


def generate(folder: str, **options) -> list:
    llm = LLM(folder, **{**ENGINE, **options})
    return llm, llm.generate(PROMPTS, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_and_logprobs_match_hf(case, checkpoints):
    folder = checkpoints(case)
    llm, outputs = generate(folder)
    assert type(llm.engine.core.runner.model).__name__ == CASES[case][1]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for out in outputs:
        tokens, logprobs = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        check_logprobs_close(out.outputs[0], tokens, logprobs, atol=1e-3)


def test_every_architecture_of_the_issue_is_registered():
    for name in ("OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"):
        assert name in supported_architectures()


def test_unsupported_architecture_lists_the_supported_ones():
    config = LlamaConfig(architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match="FalconForCausalLM is not supported") as e:
        get_model_class(config)
    assert "OPTForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_hf_in_the_same_dtype(dtype, checkpoints):
    """Our model in dtype vs HF's in dtype: the same rounding points, looser tolerance."""
    folder = checkpoints("llama")
    llm, outputs = generate(folder, dtype=dtype)
    assert {p.dtype for p in llm.engine.core.runner.model.parameters()} == {getattr(torch, dtype)}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    for out in outputs:
        tokens, logprobs = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        check_logprobs_close(out.outputs[0], tokens, logprobs, atol=0.1)


def test_dtype_auto(checkpoints):
    hf_config = open_checkpoint(EngineArgs(model=checkpoints("llama"))).hf_config
    assert resolve_dtype("auto", hf_config, "cpu") in (torch.float32, torch.bfloat16)  # bf16 where the CPU has it
    assert resolve_dtype("auto", hf_config, "cuda") == torch.bfloat16  # the config says float32: too slow on a GPU
    assert resolve_dtype("float16", hf_config, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        EngineArgs(dtype="float8")


@pytest.mark.parametrize("case", ["opt", "gpt2"])
def test_original_checkpoint_names_load(case, checkpoints, tmp_path):
    """facebook/opt-125m and gpt2 were saved from the base model: no `model.` / `transformer.`
    prefix, and gpt2 carries its causal-mask buffers. They give the same outputs."""
    folder = checkpoints(case)
    legacy = tmp_path / "legacy"
    os.makedirs(legacy)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(folder, name), legacy / name)
    state = load_file(os.path.join(folder, "model.safetensors"))
    state = {k.removeprefix("model.").removeprefix("transformer."): v for k, v in state.items()}
    if case == "gpt2":
        state |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 256, 256)) for i in range(2)}
        state |= {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}
    save_file(state, str(legacy / "model.safetensors"))
    _, expected = generate(folder)
    _, outputs = generate(str(legacy))
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_missing_and_unexpected_tensors_are_named(checkpoints, tmp_path):
    folder = checkpoints("opt")
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(folder, name), broken / name)
    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["model.decoder.layers.1.fc2.weight"]
    state["model.decoder.layers.1.fc3.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['decoder.layers.1.fc2.weight'\].*unexpected tensors \['decoder.layers.1.fc3.weight'\]"):
        LLM(str(broken), **ENGINE)


def test_weights_stream_one_shard_at_a_time(tokenizer_dir, vocab, tmp_path, monkeypatch):
    """Sharded safetensors with an index: shard i+1 is opened only once every tensor of shard i
    has been handed over, so memory holds the model plus one tensor, never two copies."""
    import json

    import pagedllm.loader.checkpoint as checkpoint_module

    config = CASES["llama"][0](vocab)
    folder = build_checkpoint(config, str(tmp_path / "sharded"), tokenizer_dir, max_shard_size="1MB")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard_of = json.load(f)["weight_map"]
    shards = sorted(set(shard_of.values()))
    assert len(shards) > 1
    events: list[str] = []
    real_open = checkpoint_module.open_safetensors

    def recording_open(path, *args):
        events.append(f"open {os.path.basename(path)}")
        yield from real_open(path, *args)

    monkeypatch.setattr(checkpoint_module, "open_safetensors", recording_open)
    checkpoint = open_checkpoint(EngineArgs(model=folder))
    assert checkpoint.num_tensors == len(shard_of)  # the progress bar's total
    for name, _ in checkpoint.weights(torch.float32):
        events.append(f"tensor of {shard_of[name]}")
    expected = []
    for shard in shards:
        expected += [f"open {shard}"] + [f"tensor of {shard}"] * sum(s == shard for s in shard_of.values())
    assert events == expected


def test_sliding_window_caps_max_model_len(tokenizer_dir, tmp_path, vocab):
    config = MistralConfig(vocab_size=vocab, tie_word_embeddings=True, sliding_window=64, **LLAMA_SHAPE)
    folder = build_checkpoint(config, str(tmp_path / "mistral"), tokenizer_dir)
    assert open_checkpoint(EngineArgs(model=folder)).max_position_embeddings == 64
    llm = LLM(folder, **ENGINE)
    assert llm.engine.core.runner.config.max_model_len == 64


def test_offline_inference_example_runs_on_opt(checkpoints):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "offline_inference.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_NO_PROGRESS": "1"}
    result = subprocess.run(
        [sys.executable, example, "--model", checkpoints("opt")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Prompt: ") == 4


def test_safetensors_reader_matches_the_library(tmp_path):
    from pagedllm.loader.checkpoint import open_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(7, generator=gen).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=gen),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "i64": torch.arange(10),
        "bool": torch.tensor([True, False, True]),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    ours = {name: tensor.read() for name, tensor in open_safetensors(path)}
    expected = load_file(path)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_checkpoint_tensor_reads_the_rows_asked_for(tmp_path):
    from pagedllm.loader.checkpoint import open_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(6, 5, generator=gen).to(torch.bfloat16),
        "f32": torch.randn(4, 3, 2, generator=gen),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    taken = []
    for name, lazy in open_safetensors(path):
        full = tensors[name]
        assert lazy.shape == full.shape and lazy.dtype == full.dtype and lazy.dim() == full.dim()
        assert torch.equal(lazy.read(), full)
        if full.dim() and full.shape[0] >= 3:
            assert torch.equal(lazy.narrow(0, 1, 2), full.narrow(0, 1, 2))  # rows 1..2 only
            assert torch.equal(lazy.narrow(1, 1, 1), full.narrow(1, 1, 1))  # read whole, then narrowed
            assert torch.equal(lazy.to(torch.float32).narrow(0, 2, 1), full.narrow(0, 2, 1).float())
            assert lazy.to(torch.float32).dtype == torch.float32
        taken.append(lazy.to(torch.float64))
    with pytest.raises(RuntimeError, match="only until the next one is taken"):
        taken[0].read()


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_tensor_parallel_rank_reads_its_rows_only(checkpoints, monkeypatch, world_size):
    """Loading rank r of N reads whole only what it cannot take rows of (norms, row-parallel
    matrices, whose slices are columns); the column-parallel matrices and the vocabulary table
    are read a rank's rows at a time, so the ranks together read the file about once."""
    import pagedllm.loader.checkpoint as checkpoint_module
    from pagedllm.distributed import TensorParallelGroup
    from pagedllm.loader.model_loader import load_model

    folder = checkpoints("llama")
    state = load_file(os.path.join(folder, "model.safetensors"))
    data_bytes = sum(t.numel() * t.element_size() for t in state.values())
    whole = sum(t.numel() * t.element_size() for n, t in state.items() if any(w in n for w in ("o_proj", "down_proj", "norm")))
    real_read = checkpoint_module._read_exactly
    read_bytes = []

    def counting_read(f, buffer, file):
        read_bytes[-1] += len(buffer)
        real_read(f, buffer, file)

    monkeypatch.setattr(checkpoint_module, "_read_exactly", counting_read)
    loaded = []
    for rank in range(world_size):
        read_bytes.append(0)
        loaded.append(load_model(EngineArgs(model=folder, dtype="float32"), TensorParallelGroup(rank, world_size)).model)
    if world_size == 1:
        assert read_bytes == [data_bytes]
        return
    assert sum(read_bytes) == data_bytes + (world_size - 1) * whole  # every row-sliceable byte read once
    assert max(read_bytes) < data_bytes * 0.75
    # and what rank 1 read is its rows: its embedding rows equal the checkpoint's
    table = state["model.embed_tokens.weight"]
    embedding = loaded[1].get_submodule("model.embed_tokens")
    rows = embedding.vocab_end - embedding.vocab_start
    assert torch.equal(embedding.weight[:rows], table[embedding.vocab_start : embedding.vocab_end])
