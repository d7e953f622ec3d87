"""Tensor parallelism on GPUs (NCCL): the same greedy tokens with 2 ranks as with 1, CUDA graphs
on; decode speed of both; a worker killed mid-run fails the engine within seconds.

    PYTHONPATH=. python scripts/gpu_tp_check.py [--dtype bfloat16] [--out DIR] [--small]

Builds a random-weight Llama-family checkpoint (GQA 16:8 heads, hidden 2048, 8 layers) with
HF transformers, prompts as token ids (no tokenizer). Prints PASS/FAIL lines and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build(folder: str, small: bool) -> str:
    from model_utils import randomize_
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers = (256, 2) if small else (2048, 8)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, 0)
    model.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true", help="a small model (a smoke test on CPU)")
    opts = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    folder = build(tempfile.mkdtemp(prefix="tp-llama-"), opts.small)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 32000, (n,), generator=gen).tolist() for n in (5, 17, 300, 1000)]
    greedy = SamplingParams(temperature=0, max_tokens=32, logprobs=5, ignore_eos=True)
    engine = dict(dtype=opts.dtype, skip_tokenizer_init=True, gpu_memory_utilization=0.5, max_num_seqs=64)
    results, summary, ok = {}, {"dtype": opts.dtype}, True
    for n in (1, 2):
        llm = LLM(folder, tensor_parallel_size=n, **engine)
        results[n] = llm.generate(prompts, greedy, use_tqdm=False)
        batch = [torch.randint(100, 32000, (64,), generator=gen).tolist() for _ in range(64)]
        decode = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        llm.generate(batch[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
        start = time.perf_counter()
        llm.generate(batch, decode, use_tqdm=False)
        elapsed = time.perf_counter() - start
        summary[f"tp{n}_tokens_per_s_batch64"] = round(64 * 128 / elapsed, 1)
        llm.engine.core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the one-rank engine's memory, before workers size their caches on GPU 0
    for i, (a, b) in enumerate(zip(results[2], results[1])):
        a, b = a.outputs[0], b.outputs[0]
        same = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        near_tie = same == len(a.token_ids) or (a.token_ids[same] in b.logprobs[same] and b.token_ids[same] in a.logprobs[same])
        drift = max((abs(a.logprobs[j][a.token_ids[j]].logprob - b.logprobs[j][b.token_ids[j]].logprob) for j in range(same)), default=0.0)
        passed = near_tie and drift < (0.15 if opts.dtype != "float32" else 1e-3)
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} prompt {i} ({len(prompts[i])} tokens): first {same} of 32 tokens equal, max logprob drift {drift:.4f}")

    # A worker killed mid-run: a RuntimeError that names it, within seconds, and no worker left.
    llm = LLM(folder, tensor_parallel_size=2, **engine)
    core_engine = llm.engine
    core_engine.add_request("long", prompts[2], SamplingParams(max_tokens=3000, ignore_eos=True))
    for _ in range(5):
        core_engine.step()
    victim = next(p for p in multiprocessing.active_children() if p.name == "pagedllm-tp-worker-1")
    os.kill(victim.pid, signal.SIGKILL)
    start = time.monotonic()
    try:
        while core_engine.has_unfinished_requests():
            core_engine.step()
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    elapsed = time.monotonic() - start
    left = [p.name for p in multiprocessing.active_children() if p.name.startswith("pagedllm-tp-worker")]
    passed = "rank 1" in message and "SIGKILL" in message and elapsed < 10 and not left
    ok &= passed
    print(f"{'PASS' if passed else 'FAIL'} killed worker: {elapsed:.2f} s, workers left {left}, error: {message.splitlines()[0]}")
    summary["kill_to_error_s"] = round(elapsed, 2)
    summary["pass"] = ok
    print(json.dumps(summary))
    if opts.out:
        with open(os.path.join(opts.out, "gpu_tp_check.json"), "w") as f:
            json.dump(summary, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
