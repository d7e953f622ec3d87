"""Single-stream decode of several engine configurations of the bundled model, interleaved in one
process, so that a busy shared machine slows them alike: the least ms per decode step over rounds.

    PYTHONPATH=. .venv/bin/python scripts/cpu_decode_ab.py THREADS '{"fp32": {"dtype": "float32"},
        "fp32+gguf": {"dtype": "float32", "quantization": "gguf"}}' [ROUNDS]

Each config is a dict of LLM(...) keywords. A step's time is (generate 25 tokens - generate 1) / 24.
"""
import json
import sys
import time

import torch

from pagedllm import LLM, SamplingParams

PROMPT = [list(range(1000, 1032))]


def step_ms(llm: LLM, steps: int = 24) -> float:
    def seconds(max_tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    return (seconds(steps + 1) - seconds(1)) / steps * 1000


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    configs = json.loads(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    llms = {name: LLM(None, seed=0, kv_cache_memory="128MiB", max_model_len=1024, **kw) for name, kw in configs.items()}
    best = dict.fromkeys(llms, float("inf"))
    for r in range(rounds):
        for name, llm in llms.items():
            best[name] = min(best[name], step_ms(llm))
        print(r, {name: round(ms, 2) for name, ms in best.items()}, flush=True)


if __name__ == "__main__":
    main()
