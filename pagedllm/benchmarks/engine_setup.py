"""The engine options every offline benchmark takes (throughput, latency, profile), and the
LLM options they turn into: one place, so every benchmark builds our engine the same way."""

from __future__ import annotations

import argparse

from pagedllm.benchmarks import workloads


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model to load (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--model-config", choices=sorted(workloads.MODEL_CONFIGS), default=None,
                        help="random-weight model of a well-known shape instead of --model (GPU benchmarks; tiny: CPU smoke runs)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (default: auto)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="engine: max sequences per step (default: 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine: token budget per step")
    parser.add_argument("--kv-cache-memory", default=None, help="engine on CPU: KV cache size (default: 1GiB)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="engine on GPU (default: 0.85)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="engine: GPUs (ranks) to split the model over (default: 1)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--attention-backend", default=None, help="torch or triton (default: by device)")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="engine: schedule step N+1 while step N runs (default: auto)")
    parser.add_argument("--quantization", choices=["gguf", "int4", "int8"], default=None,
                        help="engine on CPU: compute on quantized weights (default: dense)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="engine: KV cache dtype (default: auto, the model's; float16 with CPU quantized compute)")
    parser.add_argument("--output-json", default=None, help="append one JSON line per figure to this file")


def engine_options(args: argparse.Namespace, gpu: bool, folder: str) -> tuple[str | None, dict]:
    """(model, LLM options) for `LLM(model, **options)`; a --model-config is written to `folder`."""
    options = dict(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager, attention_backend=args.attention_backend, seed=0,
        async_scheduling=args.async_scheduling, tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.quantization:
        options["quantization"] = args.quantization
    if gpu:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    elif args.kv_cache_memory:
        options["kv_cache_memory"] = args.kv_cache_memory
    if not args.model_config:
        return args.model, options
    options.update(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)
    return workloads.write_config_folder(args.model_config, folder), options
