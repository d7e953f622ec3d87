"""Load time: pagedllm's load_model vs HF transformers' from_pretrained, in the same run.

Models:
  bundled   the bundled SmolLM2-135M-Instruct Q4_1 GGUF (both sides dequantize it)
  llama-1b  a random-weight Llama-3.2-1B-shaped checkpoint, bf16 safetensors, built on first use

Each trial runs in a fresh process (imports done before the clock starts), ours and HF's
alternating, after one untimed warm-up of each so both read from a warm page cache. Timed:
config + weights + tokenizer on the device, i.e. what stands between `LLM(...)` and the KV
cache allocation. Prints one JSON line per trial and a summary (medians, ratio, peak memory).

    python scripts/bench_load_time.py --model llama-1b --dtype bfloat16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from pagedllm.loader.catalogue import CATALOGUE

# Llama-3.2-1B's config.json, less its name.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"],
)


def build_llama_1b(folder: str) -> None:
    """Config, bf16 safetensors (random, one tensor at a time into one file as HF would for
    2.5 GB) and a tokenizer: the SmolLM2 one where the bundled GGUF is installed, else a tiny BPE."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    os.makedirs(folder, exist_ok=True)
    config = LlamaConfig(**LLAMA_1B, dtype="bfloat16")
    config.save_pretrained(folder)
    E, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, E), "model.norm.weight": (E,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (E, E), p + "self_attn.k_proj.weight": (kv, E),
            p + "self_attn.v_proj.weight": (kv, E), p + "self_attn.o_proj.weight": (E, E),
            p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E), p + "mlp.down_proj.weight": (E, F),
        }
    gen = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(folder)


def _save_tokenizer(folder: str) -> None:
    try:
        from transformers import AutoTokenizer

        from pagedllm.loader.gguf import find_bundled_model

        directory, name = os.path.split(find_bundled_model())
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(folder)
    except (FileNotFoundError, ImportError):  # no bundled model on this machine (the GPU one): a small BPE
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


# --------------------------------------------------------------------------- one trial (child process)


def child(side: str, model: str, dtype: str, device: str) -> dict:
    import torch

    # Imports both sides need, done before the clock: transformers imports its model and
    # config modules lazily, and that first import (seconds) is not loading.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig  # noqa: F401

    if side == "ours":
        from pagedllm.config import EngineArgs
        from pagedllm.loader.model_loader import load_model

        args = EngineArgs(model=None if model == "bundled" else model, dtype=dtype, device=device)
        start = time.perf_counter()
        loaded = load_model(args)
        _sync(device)
        seconds = time.perf_counter() - start
        params = list(loaded.model.parameters())
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = dict(dtype=getattr(torch, dtype), device_map=device)
        if model == "bundled" or model in CATALOGUE:  # a GGUF file: the bundled one, or a pulled one
            from pagedllm.loader.resolve import resolve_model

            folder, name = os.path.split(resolve_model(None if model == "bundled" else model).path)
            kwargs["gguf_file"] = name
        else:
            folder = model
        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        AutoTokenizer.from_pretrained(folder, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        _sync(device)
        seconds = time.perf_counter() - start
        params = list(hf.parameters())
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # of loading, before the read below
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    # Reading every weight once: what a first forward pass needs. HF leaves safetensors weights
    # memory-mapped, so part of its loading happens here, at first use.
    start = time.perf_counter()
    for p in params:
        p.sum(dtype=torch.float32)
    _sync(device)
    touch = time.perf_counter() - start
    num_params = sum(p.numel() for p in params)
    result = dict(side=side, seconds=round(seconds, 3), first_read_s=round(touch, 3), params_m=round(num_params / 1e6, 1))
    result["peak_rss_gb"] = round(peak_rss_gb, 2)
    if peak_gpu_gb is not None:
        result["peak_gpu_gb"] = round(peak_gpu_gb, 2)
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bundled", "llama-1b", *CATALOGUE], default="bundled",
                        help="a catalogue name loads its pulled GGUF (`pagedllm pull NAME` first)")
    parser.add_argument("--folder", default="/tmp/pagedllm-bench/llama-1b", help="where the llama-1b checkpoint lives")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    model = args.folder if args.model == "llama-1b" else args.model
    if args.child:
        print(json.dumps(child(args.child, model, args.dtype, args.device)))
        return
    if args.model == "llama-1b" and not os.path.exists(os.path.join(args.folder, "model.safetensors")):
        start = time.perf_counter()
        build_llama_1b(args.folder)
        print(f"built {args.folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    import torch

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    header = dict(benchmark="load_time", model=args.model, dtype=args.dtype, device=args.device, machine=machine,
                  torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(header))
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    for trial in range(args.repeat + 1):  # trial 0 warms the page cache and is not counted
        for side in ("ours", "hf"):
            command = [sys.executable, __file__, "--child", side, "--model", args.model, "--folder", args.folder,
                       "--dtype", args.dtype, "--device", args.device]
            env = {**os.environ, "PAGEDLLM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(command, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1]) | dict(trial=trial)
            print(json.dumps(result))
            if trial:
                results[side].append(result)
    ours = statistics.median(r["seconds"] for r in results["ours"])
    hf = statistics.median(r["seconds"] for r in results["hf"])
    ours_total = statistics.median(r["seconds"] + r["first_read_s"] for r in results["ours"])
    hf_total = statistics.median(r["seconds"] + r["first_read_s"] for r in results["hf"])
    summary = header | dict(
        ours_s=ours, hf_s=hf, speedup=round(hf / ours, 2),
        ours_with_first_read_s=round(ours_total, 3), hf_with_first_read_s=round(hf_total, 3),
        speedup_with_first_read=round(hf_total / ours_total, 2),
        ours_peak_rss_gb=max(r["peak_rss_gb"] for r in results["ours"]),
        hf_peak_rss_gb=max(r["peak_rss_gb"] for r in results["hf"]),
    )
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
