"""`pagedllm bench throughput|latency`: our offline engine and a peer, same run.

    pagedllm bench throughput                                # bundled model on CPU vs HF generate
    pagedllm bench throughput --model-config llama-8b --peer hf   # GPU, random weights
    pagedllm bench latency --model-config smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from pagedllm.benchmarks import hardware, peers, workloads
from pagedllm.benchmarks.workloads import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", choices=["throughput", "latency"], help="which workload")
    parser.add_argument("--model", default=None, help="model to load (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--model-config", choices=sorted(workloads.MODEL_CONFIGS), default=None,
                        help="random-weight model of a well-known shape instead of --model (GPU benchmarks)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (default: auto)")
    parser.add_argument("--peer", choices=["hf", "none"], default="hf", help="peer measured in the same run (default: hf)")
    parser.add_argument("--num-prompts", type=int, default=None, help="throughput: requests (default: 256 GPU, 64 CPU)")
    parser.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="throughput: prompt length range (default: 100 1024 GPU, 16 256 CPU)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens per request (default: 256 GPU, 128 CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="latency: batch sizes (default: 1 64 GPU, 1 CPU)")
    parser.add_argument("--peer-batch-size", type=int, default=32, help="HF generate: padded batch size (default: 32)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="engine: max sequences per step (default: 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine: token budget per step")
    parser.add_argument("--kv-cache-memory", default=None, help="engine on CPU: KV cache size (default: 1GiB)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="engine on GPU (default: 0.85)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--attention-backend", default=None, help="torch or triton (default: by device)")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="engine: schedule step N+1 while step N runs (default: auto)")
    parser.add_argument("--output-json", default=None, help="append one JSON line per figure to this file")


def main(args: argparse.Namespace) -> list[dict]:
    from pagedllm import LLM

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tmp = tempfile.mkdtemp(prefix="pagedllm-bench-")
    options = dict(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager, attention_backend=args.attention_backend, seed=0,
        async_scheduling=args.async_scheduling,
    )
    if gpu:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    elif args.kv_cache_memory:
        options["kv_cache_memory"] = args.kv_cache_memory
    if args.model_config:
        model = workloads.write_config_folder(args.model_config, tmp)
        options.update(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)
    else:
        model = args.model
    start = time.perf_counter()
    llm = LLM(model, **options)
    startup = time.perf_counter() - start
    core = llm.engine.core
    vocab = core.info.vocab_size
    dtype = core.runner.config.dtype
    num_params = sum(p.numel() for p in core.runner.model.parameters())
    machine = hardware.describe(device)

    if args.workload == "throughput":
        n = args.num_prompts or (256 if gpu else 64)
        lo, hi = args.input_len or ((100, 1024) if gpu else (16, 256))
        runs = [workloads.throughput(n, lo, hi, args.output_len or (256 if gpu else 128), vocab)]
    else:
        out_len = args.output_len or (256 if gpu else 128)
        in_len = 128 if gpu else 32
        runs = [
            workloads.latency(bs, in_len if bs == 1 else (512 if gpu else in_len), out_len, vocab)
            for bs in args.batch_sizes or ([1, 64] if gpu else [1])
        ]

    hf = None
    if args.peer == "hf":
        hf = peers.load_hf_model(args.model_config, None if args.model_config else core.runner.config.source, dtype, device,
                                 paged=gpu and args.workload == "throughput")
    results = []
    for w in runs:
        ours = run_ours(llm, w, device)
        peer_name, peer = None, None
        if hf is not None:
            if gpu and args.workload == "throughput":
                peer_name, peer = "hf generate_batch (paged|sdpa)", peers.hf_generate_batch(hf, w, device)
            else:
                peer_name, peer = "hf generate", peers.hf_generate(hf, w, device, args.peer_batch_size)
        result = dict(
            workload=w.name, model=args.model_config or core.info.model_name, dtype=str(dtype).removeprefix("torch."),
            machine=machine, async_scheduling=core.async_scheduling, startup_s=round(startup, 2), seconds=round(ours, 3),
            output_tok_s=round(w.num_output_tokens / ours, 1),
            total_tok_s=round((w.num_output_tokens + w.num_prompt_tokens) / ours, 1),
            ms_per_step=round(ours / w.output_lens[0] * 1000, 2),
        )
        if gpu and args.workload == "throughput":
            flops = 2 * num_params * (w.num_output_tokens + w.num_prompt_tokens)
            result["mfu"] = round(flops / ours / hardware.peak_flops(dtype), 3)
        if gpu and args.workload == "latency":
            weight_bytes = num_params * torch.empty(0, dtype=dtype).element_size()
            result["mbu"] = round(weight_bytes / (ours / w.output_lens[0]) / hardware.memory_bandwidth(), 3)
        if peer is not None:
            result.update(peer=peer_name, peer_seconds=round(peer, 3), peer_output_tok_s=round(w.num_output_tokens / peer, 1),
                          ratio=round(peer / ours, 2))
        results.append(result)
        _report(result, args.output_json)
    return results


def run_ours(llm, w: Workload, device: str) -> float:
    from pagedllm import SamplingParams

    llm.generate(w.prompts[:8], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(w.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == w.num_output_tokens, f"made {produced} tokens, expected {w.num_output_tokens}"
    return seconds


def _report(result: dict, path: str | None) -> None:
    line = f"{result['workload']} {result['model']} {result['dtype']} async={result['async_scheduling']}: " \
           f"{result['output_tok_s']} output tok/s, " \
           f"{result['ms_per_step']} ms/step"
    if "mfu" in result:
        line += f", MFU {result['mfu']:.1%}"
    if "mbu" in result:
        line += f", MBU {result['mbu']:.1%}"
    if "peer" in result:
        line += f" | {result['peer']}: {result['peer_output_tok_s']} output tok/s | ratio {result['ratio']}x"
    print(line, flush=True)
    print(json.dumps(result), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    main(parser.parse_args())
