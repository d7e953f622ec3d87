"""GPU correctness of the whole engine: the bundled SmolLM2 (greedy, bf16 and fp32)
against HF transformers on the same GPU, and against our CPU run.

    PYTHONPATH=. python scripts/gpu_e2e.py --gguf PATH [--cpu-reference FILE]
Prints PASS/FAIL per prompt and one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import check_logprobs_close, hf_greedy  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 8,
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(args.gguf)
    summary = {}
    # (dtype, logprob tolerance, memory share: the first engine's memory may outlive it)
    # bf16 logprobs of two implementations drift by a few tenths (rounding of 30 layers);
    # the token rule is vLLM's check_logprobs_close either way.
    for dtype, atol, share in (("float32", 0.02, 0.15), ("bfloat16", 0.5, 0.4)):
        llm = LLM(args.gguf, dtype=dtype, gpu_memory_utilization=share, max_model_len=2048)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).cuda().eval()
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=5, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        passed = 0
        for out in outputs:
            hf_tokens, hf_logprobs = hf_greedy(hf, out.prompt_token_ids, args.max_tokens)
            hf_logprobs = [lp.cpu() for lp in hf_logprobs]
            try:
                check_logprobs_close(out.outputs[0], hf_tokens, hf_logprobs, atol=atol)
                passed += 1
                print(f"PASS {dtype} {out.prompt[:40]!r}: {out.outputs[0].text[:60]!r}")
            except AssertionError as e:
                print(f"FAIL {dtype} {out.prompt[:40]!r}: {e}")
        chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0), use_tqdm=False)
        print(f"chat {dtype}: {chat[0].outputs[0].text!r}")
        summary[dtype] = dict(passed=passed, total=len(PROMPTS), chat=chat[0].outputs[0].text,
                              greedy_ids=[o.outputs[0].token_ids for o in outputs])
        del llm, hf
        torch.cuda.empty_cache()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
