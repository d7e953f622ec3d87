"""GGUF `qwen2` / `qwen3` files against transformers loading the same file: tokenizer, weights
(K-quants included) and greedy generation, on small random files written with gguf-py.

The vocabulary is the bundled SmolLM2's (49k byte-level BPE) under Qwen's pre-tokenizer name,
so what is checked is Qwen's split and our handling of it; the real Qwen vocabulary is checked
by scripts/check_real_models.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf_utils import Q, decoder_tensors, tokenizer_metadata, write_gguf
from model_utils import one_thread  # noqa: F401 (fixture)
from reference import check_logprobs_close, hf_greedy
from test_gguf_loader import TEXTS

from pagedllm import LLM, SamplingParams
from pagedllm.loader.gguf import iter_gguf_weights, load_gguf_config_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 512, 2
QWEN_TEXTS = TEXTS + ["x = 12345 + 678\n\n\tfoo(bar)", "I'LL go, you'RE here; it's 3.5", "  \n\n  spaces\r\n"]
CHAT_TEMPLATE = (  # Qwen2.5's, shortened: the part a plain conversation uses
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TYPES = {  # every K-quant somewhere, as Q4_K_M files mix them
    "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q3_K,
    "ffn_gate": Q.Q2_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0, "output": Q.Q6_K,
}  # fmt: skip


def write_qwen(path: str, architecture: str, bundled_gguf: str, vocab: int | None = None) -> str:
    """vocab: keep only the first `vocab` tokens and no merges (for the model checks: transformers
    reads the whole vocabulary, slowly, even to load only the weights)."""
    # Qwen3 sets head_dim on its own (heads x head_dim != hidden); transformers' GGUF mapping ignores
    # attention.key_length and takes Qwen3Config's default, 128, so that is what is written here.
    head_dim = HIDDEN // HEADS if architecture == "qwen2" else 128
    tokenizer = tokenizer_metadata(bundled_gguf) | {"tokenizer.ggml.pre": "qwen2", "tokenizer.chat_template": CHAT_TEMPLATE}
    if vocab is not None:
        tokenizer |= {"tokenizer.ggml.merges": [], "tokenizer.ggml.tokens": tokenizer["tokenizer.ggml.tokens"][:vocab],
                      "tokenizer.ggml.token_type": tokenizer["tokenizer.ggml.token_type"][:vocab]}  # fmt: skip
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    hparams = {
        "block_count": LAYERS, "context_length": 512, "embedding_length": HIDDEN, "feed_forward_length": FFN,
        "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.freq_base": 1000000.0,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }  # fmt: skip
    if architecture == "qwen2":
        extra = {"attn_q.bias": (HEADS * head_dim,), "attn_k.bias": (KV_HEADS * head_dim,), "attn_v.bias": (KV_HEADS * head_dim,)}
    else:
        hparams |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
        extra = {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    tensors = decoder_tensors(LAYERS, HIDDEN, HEADS, KV_HEADS, head_dim, FFN, vocab, TYPES, extra)
    write_gguf(path, architecture, hparams, tensors, tokenizer)
    return path


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen_gguf(request, tmp_path_factory, bundled_gguf) -> str:
    path = str(tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf")
    return write_qwen(path, request.param, bundled_gguf, vocab=1024)


@pytest.fixture(scope="module")
def hf_qwen(qwen_gguf):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(qwen_gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory, bundled_gguf) -> str:
    return write_qwen(str(tmp_path_factory.mktemp("qwen2-tokenizer") / "qwen2.gguf"), "qwen2", bundled_gguf)


def test_tokenizer_and_chat_template_match_transformers(qwen2_gguf):
    from transformers import AutoTokenizer

    ours = load_gguf_config_and_tokenizer(qwen2_gguf).tokenizer
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(qwen2_gguf), gguf_file="qwen2.gguf")
    for text in QWEN_TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.get_vocab() == theirs.get_vocab() and ours.all_special_ids == theirs.all_special_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    for tokenize in (False, True):
        kwargs = dict(add_generation_prompt=True, tokenize=tokenize)
        assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)


def test_qwen2_pre_tokenizer_splits_digits_and_composes_unicode(qwen2_gguf):
    tok = load_gguf_config_and_tokenizer(qwen2_gguf).tokenizer
    assert tok.convert_ids_to_tokens(tok("x=12345")["input_ids"]) == ["x", "=", "1", "2", "3", "4", "5"]
    # Qwen2's tokenizer.json composes first (NFC): "e" + combining acute encodes as "é" does.
    assert tok("caf\u0065\u0301")["input_ids"] == tok("caf\u00e9")["input_ids"]


def test_config_and_weights_match_transformers(qwen_gguf, hf_qwen):
    model = hf_qwen
    config = load_gguf_config_and_tokenizer(qwen_gguf).config
    for field in ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"]:  # fmt: skip
        assert getattr(config, field, None) == getattr(model.config, field, None), field
    reference = model.state_dict()
    weights = dict(iter_gguf_weights(qwen_gguf, torch.float32))
    assert set(weights) == set(reference)
    for name, weight in weights.items():
        assert torch.equal(weight, reference[name]), name


def test_greedy_generation_matches_transformers(qwen_gguf, hf_qwen):
    model = hf_qwen
    llm = LLM(model=qwen_gguf, dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=32, max_num_seqs=8,
              skip_tokenizer_init=True)
    prompts = [list(range(start, 1024 if step > 0 else 0, step))[:length] for start, step, length in
               [(20, 7, 5), (300, 13, 40), (1000, -3, 17)]]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for output in outputs:
        hf_tokens, hf_logprobs = hf_greedy(model, output.prompt_token_ids, 8)
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs)
