"""`pagedllm bench throughput|latency|all`: our offline engine and a peer, same run.

    pagedllm bench throughput                                # bundled model on CPU vs HF generate
    pagedllm bench throughput --model-config llama-8b --peer hf   # GPU, random weights
    pagedllm bench latency --model-config smollm2-135m
    pagedllm bench all --model-config llama-1b --peer vllm --vllm-site /tmp/vsite   # one vLLM start-up
    pagedllm bench latency --quantization gguf --peer llamacpp   # CPU: int4 compute vs llama.cpp, same GGUF

`all` runs throughput then latency on one engine (and one vLLM child). With --peer vllm, vLLM runs
first in a child process that exits (freeing the GPU) before our engine starts; each figure of
both engines is one generate() of the whole workload after the same warm-up, prefill included,
and ms/step is that time / output length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from pagedllm.benchmarks import hardware, peers, vllm_peer, workloads
from pagedllm.benchmarks.engine_setup import add_engine_arguments, engine_options
from pagedllm.benchmarks.workloads import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", choices=["throughput", "latency", "all"], help="which workload (all: both)")
    add_engine_arguments(parser)
    parser.add_argument("--peer", choices=["hf", "vllm", "llamacpp", "none"], default="hf",
                        help="peer measured in the same run: HF transformers (in this process on a GPU, a child process on "
                             "the CPU), vLLM in a child process, or llama.cpp on the same GGUF file in a child process; "
                             "the children get OpenMP as you set it, not pagedllm's passive default (default: hf)")
    parser.add_argument("--peer-python", default=None,
                        help="--peer llamacpp|vllm: the Python that has llama-cpp-python or vLLM's CPU build, "
                             "e.g. a virtual environment's bin/python (default: this one)")
    parser.add_argument("--vllm-site", default=None,
                        help="--peer vllm: folder holding the unpacked vLLM bundle (default: $PAGEDLLM_VLLM_SITE, "
                             f"this environment, or {vllm_peer.DEFAULT_SITE})")
    parser.add_argument("--peer-timeout", type=float, default=600, help="--peer vllm: seconds before the child is ended (default: 600)")
    parser.add_argument("--num-prompts", type=int, default=None, help="throughput: requests (default: 256 GPU, 64 CPU)")
    parser.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="throughput: prompt length range (default: 100 1024 GPU, 16 256 CPU)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens per request (default: 256 GPU, 128 CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="latency: batch sizes (default: 1 64 GPU, 1 CPU)")
    parser.add_argument("--peer-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="--peer hf|vllm: the peer's dtype, e.g. its own best where it differs from ours "
                             "(our --quantization gguf computes in float32, vLLM's CPU build in bfloat16; default: ours)")
    parser.add_argument("--peer-batch-size", type=int, default=32, help="HF generate: padded batch size (default: 32)")


def main(args: argparse.Namespace) -> list[dict]:
    from pagedllm import LLM

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if args.peer == "llamacpp":  # say how to install it before spending minutes on our side
        from pagedllm.benchmarks import llamacpp_peer

        python = args.peer_python or llamacpp_peer.default_python()
        if not llamacpp_peer.available(python):
            raise SystemExit(llamacpp_peer.INSTALL_HINT.format(python=python))
    tmp = tempfile.mkdtemp(prefix="pagedllm-bench-")
    model, options = engine_options(args, gpu, tmp)
    if gpu and args.workload == "all" and args.peer == "hf":
        raise SystemExit("bench all with --peer hf: HF needs a different attention per workload on the GPU; "
                         "run throughput and latency separately")
    vocab = _vocab_before_load(args)
    vllm_run = None
    if args.peer == "vllm" and gpu:
        # Before our engine exists: the child's exit hands the whole GPU back to us.
        vllm_run = _run_vllm(args, model, options, make_workloads(args, vocab, gpu) if vocab else None, gpu,
                             dtype=args.peer_dtype)
        if vllm_run is not None:
            _wait_for_free_gpu_memory(args.tensor_parallel_size)

    start = time.perf_counter()
    llm = LLM(model, **options)
    startup = time.perf_counter() - start
    model_name, vocab_loaded, dtype, num_params = _engine_facts(llm, args, gpu)
    vocab = vocab or vocab_loaded
    machine = hardware.describe(device)
    runs = make_workloads(args, vocab, gpu)
    peer_dtype = getattr(torch, args.peer_dtype) if args.peer_dtype else dtype

    if args.peer == "vllm" and not gpu:  # CPU: after ours, which resolves the model and its prompts
        vllm_run = _run_vllm(args, _hf_folder_for_vllm(args, llm, peer_dtype, tmp), options, runs, gpu,
                             dtype=str(peer_dtype).removeprefix("torch."))
    hf = None
    if args.peer == "hf" and gpu:
        hf = peers.load_hf_model(args.model_config, None if args.model_config else llm.engine.core.executor.model_info.config.source, peer_dtype, device,
                                 paged=gpu and args.workload != "latency")
    results = []
    for w in runs:
        ours = run_ours(llm, w, device)
        peer_name, peer = None, None
        if hf is not None:
            if gpu and w.name.startswith("throughput"):
                peer_name, peer = "hf generate_batch (paged|sdpa)", peers.hf_generate_batch(hf, w, device)
            else:
                peer_name, peer = "hf generate", peers.hf_generate(hf, w, device, args.peer_batch_size)
        elif args.peer == "hf":
            gguf_path = None if args.model_config else llm.engine.core.executor.model_info.config.source
            peer_name = "hf generate"
            peer = peers.run_in_child(args.model_config, gguf_path, peer_dtype, w, args.peer_batch_size, torch.get_num_threads())
        elif args.peer == "llamacpp":
            source = llm.engine.core.runner.config.source
            timing = llamacpp_peer.run(python, source, w.prompts, w.output_lens[0], torch.get_num_threads())
            peer_name, peer = "llama.cpp (all sequences batched)", timing["seconds"]
        result = dict(
            engine="pagedllm", workload=w.name, model=args.model_config or model_name,
            dtype=str(dtype).removeprefix("torch."), quantization=options.get("quantization"),
            tensor_parallel_size=args.tensor_parallel_size, machine=machine,
            async_scheduling=getattr(llm.engine.core, "async_scheduling", None), startup_s=round(startup, 2),
            **_figures(w, ours),
        )
        if gpu and num_params and w.name.startswith("throughput"):
            flops = 2 * num_params * (w.num_output_tokens + w.num_prompt_tokens)
            result["mfu"] = round(flops / ours / hardware.peak_flops(dtype), 3)
        if gpu and num_params and w.name.startswith("latency"):
            weight_bytes = num_params * torch.empty(0, dtype=dtype).element_size()
            result["mbu"] = round(weight_bytes / (ours / w.output_lens[0]) / hardware.memory_bandwidth(), 3)
        if peer is not None:
            if args.peer == "hf":
                result["peer_dtype"] = str(peer_dtype).removeprefix("torch.")
            result.update(peer=peer_name, peer_seconds=round(peer, 3), peer_output_tok_s=round(w.num_output_tokens / peer, 1),
                          ratio=round(peer / ours, 2))
        figure = vllm_run.figures.get(w.name) if vllm_run else None
        if figure is not None:
            result.update(peer=vllm_run.version, peer_dtype=vllm_run.dtype, peer_seconds=round(figure.seconds, 3),
                          peer_output_tok_s=round(w.num_output_tokens / figure.seconds, 1),
                          peer_ms_per_step=round(figure.seconds / w.output_lens[0] * 1000, 2),
                          peer_startup_s=vllm_run.startup_s, ratio=round(figure.seconds / ours, 2))
        results.append(result)
        _report(result, args.output_json)
        if figure is not None:
            peer_line = dict(engine=vllm_run.version, workload=w.name, model=result["model"], dtype=vllm_run.dtype,
                             machine=machine, startup_s=vllm_run.startup_s, **_figures(w, figure.seconds))
            results.append(peer_line)
            _write_json(peer_line, args.output_json)
    return results


def make_workloads(args: argparse.Namespace, vocab: int, gpu: bool) -> list[Workload]:
    runs = []
    if args.workload in ("throughput", "all"):
        n = args.num_prompts or (256 if gpu else 64)
        lo, hi = args.input_len or ((100, 1024) if gpu else (16, 256))
        runs.append(workloads.throughput(n, lo, hi, args.output_len or (256 if gpu else 128), vocab))
    if args.workload in ("latency", "all"):
        out_len = args.output_len or (256 if gpu else 128)
        in_len = 128 if gpu else 32
        runs += [
            workloads.latency(bs, in_len if bs == 1 else (512 if gpu else in_len), out_len, vocab)
            for bs in args.batch_sizes or ([1, 64] if gpu else [1])
        ]
    return runs


def _engine_facts(llm, args: argparse.Namespace, gpu: bool) -> tuple[str, int | None, torch.dtype, int | None]:
    """(model name, vocab size, dtype, parameter count) of the loaded engine. These live in engine
    internals that the engine rewrite may move: without them, a model config still gives its
    vocabulary and exact Llama parameter count, and the bench still runs."""
    try:
        core = llm.engine.core
        config = core.executor.model_info.config  # the runners may live in tensor-parallel workers
        return core.info.model_name, core.info.vocab_size, config.dtype, _num_params(config.hf_config)
    except AttributeError:
        if not args.model_config:
            raise
        c = workloads.MODEL_CONFIGS[args.model_config]
        hidden, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
        layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * c["intermediate_size"] + 2 * hidden
        embeddings = c["vocab_size"] * hidden * (1 if c["tie_word_embeddings"] else 2)
        dtype = torch.bfloat16 if gpu and args.dtype == "auto" else getattr(torch, args.dtype, torch.float32)
        return args.model_config, c["vocab_size"], dtype, embeddings + c["num_hidden_layers"] * layer + hidden


def _vocab_before_load(args: argparse.Namespace) -> int | None:
    """The vocabulary size, known without loading our engine for a model config or an HF folder."""
    if args.model_config:
        return workloads.MODEL_CONFIGS[args.model_config]["vocab_size"]
    config = os.path.join(args.model or "", "config.json")
    if args.model and os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("vocab_size")
    return None


def _run_vllm(args: argparse.Namespace, model: str, options: dict, runs: list[Workload] | None,
              gpu: bool, dtype: str | None = None) -> vllm_peer.PeerRun | None:
    """dtype: the peer's (default: bfloat16 for a GPU model config, else --dtype)."""
    site = "" if args.peer_python else vllm_peer.locate(args.vllm_site)
    if args.peer_python and not vllm_peer.importable(args.peer_python):
        print(vllm_peer.CPU_RECIPE.format(python=args.peer_python), flush=True)
        return None
    if site is None:
        print(vllm_peer.RECIPE, flush=True)
        return None
    if runs is None:
        print("--peer vllm needs --model-config or a Hugging Face model folder (with config.json): "
              "running pagedllm alone", flush=True)
        return None
    # The model configs are bf16 models (workloads.write_config_folder): say so rather than
    # leave it to how vLLM reads the config's dtype field.
    dtype = dtype or ("bfloat16" if args.dtype == "auto" and args.model_config and gpu else args.dtype)
    engine = dict(dtype=dtype, max_model_len=2048, seed=0, max_num_seqs=args.max_num_seqs)
    if options.get("gpu_memory_utilization"):
        engine["gpu_memory_utilization"] = options["gpu_memory_utilization"]
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:  # the peer split the same way
        engine["tensor_parallel_size"] = args.tensor_parallel_size
    load_format = "dummy" if args.model_config else "auto"
    python = args.peer_python or sys.executable
    result = vllm_peer.run(site, model, load_format, engine, runs, args.peer_timeout, python=python,
                           threads=None if gpu else torch.get_num_threads())
    if result.error:
        print(result.error, flush=True)
    return result


def _hf_folder_for_vllm(args: argparse.Namespace, llm, dtype: torch.dtype, tmp: str) -> str:
    """vLLM reads Hugging Face folders: a model config's folder as it is, a GGUF as an HF-format
    copy of the same (dequantized) weights, written here."""
    source = llm.engine.core.executor.model_info.config.source
    if args.model_config or os.path.isdir(source):
        return source
    folder = os.path.join(tmp, "hf-copy")
    print(f"vLLM: writing an HF-format copy of {source} to {folder}", flush=True)
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_folder, name = os.path.split(source)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=name, dtype=dtype,
                                                 quantization_config=GgufConfig(name, dequantize=True))
    model.hf_quantizer = None  # dense now: a plain checkpoint, not a quantized one
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(folder)
    return folder


def _wait_for_free_gpu_memory(num_gpus: int, timeout: float = 30.0) -> None:
    """The driver frees a dead process's memory with a short delay: do not size our KV cache
    from a GPU that still holds vLLM's (every GPU the ranks use)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        memory = [torch.cuda.mem_get_info(d) for d in range(num_gpus)]
        if all(free >= 0.9 * total for free, total in memory):
            return
        time.sleep(0.5)
    print("warning: only " + ", ".join(f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB" for free, total in memory)
          + " of GPU memory free after vLLM exited", flush=True)


def _figures(w: Workload, seconds: float) -> dict:
    """The figures of one timed generate(), the same for every engine."""
    return dict(
        seconds=round(seconds, 3), output_tok_s=round(w.num_output_tokens / seconds, 1),
        total_tok_s=round((w.num_output_tokens + w.num_prompt_tokens) / seconds, 1),
        ms_per_step=round(seconds / w.output_lens[0] * 1000, 2),
    )


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


def _num_params(hf_config) -> int:
    """The whole model's parameters, whatever the ranks hold: counted on a model built on the
    meta device (no memory)."""
    from pagedllm.models.registry import get_model_class

    with torch.device("meta"):
        model = get_model_class(hf_config)(hf_config)
    return sum(p.numel() for p in model.parameters())


def _report(result: dict, path: str | None) -> None:
    line = f"{result['workload']} {result['model']} {result['dtype']} TP={result.get('tensor_parallel_size', 1)} " \
           f"async={result['async_scheduling']}: " \
           f"{result['output_tok_s']} output tok/s, " \
           f"{result['ms_per_step']} ms/step"
    if "mfu" in result:
        line += f", MFU {result['mfu']:.1%}"
    if "mbu" in result:
        line += f", MBU {result['mbu']:.1%}"
    if "peer_ms_per_step" in result:
        line += f" | {result['peer']}: {result['peer_output_tok_s']} output tok/s, {result['peer_ms_per_step']} ms/step" \
                f" (start-up {result['peer_startup_s']} s; ours {result['startup_s']} s) | ratio {result['ratio']}x"
    elif "peer" in result:
        line += f" | {result['peer']}: {result['peer_output_tok_s']} output tok/s | ratio {result['ratio']}x"
    print(line, flush=True)
    _write_json(result, path)


def _write_json(result: dict, path: str | None) -> None:
    print(json.dumps(result), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    main(parser.parse_args())
