"""The catalogue's real GGUF models against transformers loading the same file (CPU, float32).

    PYTHONPATH=. .venv/bin/python scripts/check_real_models.py [qwen2.5-coder-1.5b-instruct] [gemma-3-270m]

For each model (pulled first if it is not): load time of pagedllm and of transformers in the same
run, prompt token ids and the chat template rendered by both, greedy tokens and logprobs of a few
prompts under tests/reference.py's check_logprobs_close, and the model's answer to a chat question.
Prints one JSON line per model (and appends it to $OUT/real_models.jsonl when OUT is set).
CI runs tests/test_gemma3_gguf.py instead for the small model; the 1.5B one costs ~1.1 GB of
download and minutes of HF on 2 cores, so it is checked here.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import check_logprobs_close, hf_greedy  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.loader import catalogue  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 16


def check(name: str) -> dict:
    model = catalogue.CATALOGUE[name]
    path = catalogue.model_path(model) if os.path.isfile(catalogue.model_path(model)) else catalogue.pull(model)
    result: dict = {"model": name, "file": path, "threads": torch.get_num_threads()}

    start = time.perf_counter()
    llm = LLM(name, dtype="float32", max_model_len=2048, kv_cache_memory="512MiB")
    result["pagedllm_load_s"] = round(time.perf_counter() - start, 2)
    tokenizer = llm.get_tokenizer()
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) if tokenizer.chat_template else None
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    ours = llm.generate(PROMPTS, greedy, use_tqdm=False)
    if chat_text is not None:
        answer = llm.generate(chat_text, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
        result["chat_answer"] = answer.outputs[0].text
    del llm
    gc.collect()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(path)
    start = time.perf_counter()
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    result["hf_load_s"] = round(time.perf_counter() - start, 2)
    result["prompt_ids_equal"] = all(out.prompt_token_ids == hf_tokenizer(p)["input_ids"] for p, out in zip(PROMPTS, ours))
    if chat_text is not None:
        result["chat_template_equal"] = chat_text == hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    result["greedy"] = []
    for prompt, out in zip(PROMPTS, ours):
        hf_tokens, hf_logprobs = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        try:
            check_logprobs_close(out.outputs[0], hf_tokens, hf_logprobs)
            verdict = "close"
        except AssertionError as e:
            verdict = f"NOT close: {e}"
        same = sum(1 for _ in zip(out.outputs[0].token_ids, hf_tokens))
        first_diff = next((i for i, (a, b) in enumerate(zip(out.outputs[0].token_ids, hf_tokens)) if a != b), None)
        result["greedy"].append({"prompt": prompt, "verdict": verdict, "tokens": same, "first_difference": first_diff,
                                 "text": out.outputs[0].text})
    return result


def main() -> None:
    names = sys.argv[1:] or list(n for n, m in catalogue.CATALOGUE.items() if not m.in_place)
    for name in names:
        line = json.dumps(check(name))
        print(line, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "real_models.jsonl"), "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
