"""The real Gemma 3 270M (Q4_K_M GGUF, from the catalogue) against transformers loading the same file.

scripts/setup.sh pulls it (`pagedllm pull gemma-3-270m`, 253 MB); a checkout that has not is
pulled here. Its 262k SentencePiece-style vocabulary, its config, its weights (Q5_0, Q8_0, Q4_K,
Q6_K and Gemma's norms stored as 1 + w) and greedy generation across the 512-token sliding window
are compared.
"""

from __future__ import annotations

import os

import pytest
import torch
from reference import check_logprobs_close, hf_greedy
from test_gguf_loader import TEXTS

from pagedllm import LLM, SamplingParams
from pagedllm.loader import catalogue
from pagedllm.loader.gguf import iter_gguf_weights, load_gguf_config_and_tokenizer

NAME = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_gguf() -> str:
    model = catalogue.CATALOGUE[NAME]
    return catalogue.model_path(model) if os.path.isfile(catalogue.model_path(model)) else catalogue.pull(model)


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gemma_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_tokenizer_matches_transformers(gemma_gguf, hf_gemma):
    _, theirs = hf_gemma
    ours = load_gguf_config_and_tokenizer(gemma_gguf).tokenizer
    for text in TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n", "naïve   spaces\t\tand\n\n\nnewlines"]:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert len(ours) == len(theirs) == 262144
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.all_special_ids == theirs.all_special_ids


def test_weights_match_transformers(gemma_gguf, hf_gemma):
    model, _ = hf_gemma
    reference = model.state_dict()
    names = set()
    for name, weight in iter_gguf_weights(gemma_gguf, torch.float32):
        assert torch.equal(weight, reference[name]), name
        names.add(name)
    assert names == set(reference) - {"lm_head.weight"}  # tied


def test_greedy_generation_matches_transformers(gemma_gguf, hf_gemma):
    model, _ = hf_gemma
    llm = LLM(NAME, dtype="float32", kv_cache_memory="256MiB", max_num_batched_tokens=256, max_model_len=1024)
    long_prompt = "Once upon a time, in a small village by the sea, " * 60  # ~700 tokens: past the 512-token window
    prompts = ["The capital of France is", "def fibonacci(n):", long_prompt]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    for output in llm.generate(prompts, params, use_tqdm=False):
        assert output.prompt_token_ids[0] == 2  # <bos>
        hf_tokens, hf_logprobs = hf_greedy(model, output.prompt_token_ids, 8)
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs)
    assert len(llm.generate(long_prompt, params)[0].prompt_token_ids) > 512
