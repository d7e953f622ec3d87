"""HF transformers as the peer: the same prompts and lengths, EOS ignored, greedy.

On the GPU it runs in the bench's process; on the CPU in a child process (`run_in_child`), whose
OpenMP threads start with the user's settings (envs.peer_environment), not pagedllm's passive
ones, which would slow HF's hundreds of small parallel ops a step. This file is the child's
script, run by path: torch is imported before any pagedllm module, so its OpenMP runtime reads
the environment the child was given before pagedllm's default is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from pagedllm.benchmarks.workloads import Workload  # (after torch: see above)


def load_hf_model(model_config: str | None, gguf_path: str | None, dtype: torch.dtype, device: str, paged: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn = "paged|sdpa" if paged else "sdpa"
    if model_config is not None:
        from pagedllm.benchmarks.workloads import MODEL_CONFIGS

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL_CONFIGS[model_config]), dtype=dtype, attn_implementation=attn)
    else:
        import os

        folder, name = os.path.split(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation=attn).to(device)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate_batch(model, workload: Workload, device: str) -> float:
    """HF's continuous batching with paged attention (generate_batch); returns seconds.
    (Not under inference_mode: its manager updates its tensors in place from a thread.)"""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=workload.output_lens[0], do_sample=False, eos_token_id=-1, pad_token_id=0, use_cuda_graph=False
    )
    model.generate_batch(inputs=workload.prompts[:4], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0), progress_bar=False)
    _sync(device)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=workload.prompts, generation_config=config, progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    assert produced == workload.num_output_tokens, f"HF generate_batch made {produced} tokens, expected {workload.num_output_tokens}"
    return seconds


@torch.inference_mode()
def hf_generate(model, workload: Workload, device: str, batch_size: int) -> float:
    """HF's static batching: left-padded batches of `batch_size`; returns seconds."""
    def run(prompts: list[list[int]], new_tokens: int) -> None:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )
        assert out.shape[1] == width + new_tokens

    run(workload.prompts[:1], 4)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        run(workload.prompts[i : i + batch_size], workload.output_lens[0])
    _sync(device)
    return time.perf_counter() - start


def run_in_child(model_config: str | None, gguf_path: str | None, dtype: torch.dtype, workload: Workload,
                 batch_size: int, threads: int) -> float:
    """hf_generate on the CPU in a child process (see the module doc); returns its seconds."""
    from pagedllm import envs

    job = dict(model_config=model_config, gguf_path=gguf_path, dtype=str(dtype).removeprefix("torch."),
               name=workload.name, prompts=workload.prompts, output_lens=workload.output_lens,
               batch_size=batch_size, threads=threads)
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(job), capture_output=True,
                          text=True, env=envs.peer_environment())
    if done.returncode != 0:
        raise RuntimeError(f"the HF peer failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


if __name__ == "__main__":  # the child of run_in_child
    job = json.load(sys.stdin)
    torch.set_num_threads(job["threads"])
    hf = load_hf_model(job["model_config"], job["gguf_path"], getattr(torch, job["dtype"]), "cpu", paged=False)
    seconds = hf_generate(hf, Workload(job["name"], job["prompts"], job["output_lens"]), "cpu", job["batch_size"])
    print(json.dumps({"seconds": seconds}))
