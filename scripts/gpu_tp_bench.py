"""Scale-out on a 2-GPU machine, one command: correctness of tensor parallelism, then its speed,
then data parallelism through the server. JSON lines under $OUT (or --out).

    PYTHONPATH=. OUT=/tmp/out python scripts/gpu_tp_bench.py [--skip equal8b,bench,dp] [--quick]

1. equal-small: TP=2 (--split N: TP=N, on an N-GPU machine) vs TP=1 greedy on a small random
   Llama (GQA 16:8), fp32: tokens equal, logprobs within 1e-3.
2. equal-8b: the same on a random-weight checkpoint of the Llama-3.1-8B shape, bf16, under
   vLLM's check_logprobs_close rule (tokens equal until a first difference where each side's
   token is among the other's top-5; then they may diverge). Both also check that at TP=N the greedy
   tokens without logprobs (picked from the ranks' vocabulary ranges) are those with them (from the
   full logits). The checkpoint (16 GB) is written
   once to --workdir.
3. bench: `pagedllm bench all --model-config llama-8b --tensor-parallel-size 1|2` (TP=2 also with
   PAGEDLLM_FUSED_ALL_REDUCE_NORM=0); with --vllm-site, vLLM at the same TP size in the same process
   (`--peer vllm`).
4. dp: `pagedllm serve` smollm2-135m (dummy weights) with (--data-parallel-size, --api-server-count)
   (1, 1), (1, 2), (2, 1), (2, 2), each under `pagedllm bench serve --client-processes 16` (one client
   process reads only ~20k tok/s) with the same 3,072 requests; the
   ratio of output token throughput of DP=2 (two API servers) over DP=1 (one, and two).

Every step runs in its own process (the GPUs are empty between them). Lines written:
$OUT/tp_equal.jsonl, $OUT/tp_bench_{tp1,tp2,tp2_unfused}.jsonl, $OUT/dp_bench.jsonl; a PASS/FAIL line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LENS = (5, 17, 300, 1000)
MAX_TOKENS = 32


# -- 1, 2: equality --------------------------------------------------------------------------------


def write_llama_checkpoint(name: str, folder: str, num_layers: int | None = None) -> str:
    """A random-weight Llama checkpoint of a workloads.MODEL_CONFIGS shape, written tensor by
    tensor from the GPU (bf16; fp32 for the small shape): the scales of tests/model_utils.randomize_
    (norms near 1, embeddings 0.5, linear 1/sqrt(fan_in)) keep the logits peaked."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pagedllm.benchmarks.workloads import MODEL_CONFIGS

    if os.path.exists(os.path.join(folder, "done")):
        return folder
    shape = dict(MODEL_CONFIGS[name]) if name in MODEL_CONFIGS else dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
        vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
    )
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    dtype = torch.float32 if name == "small" else torch.bfloat16
    config = LlamaConfig(**shape, eos_token_id=2, bos_token_id=1)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script
    gen = torch.Generator(device).manual_seed(0)

    def tensor(*size: int, kind: str) -> torch.Tensor:
        noise = torch.randn(size, generator=gen, device=device, dtype=torch.float32)
        scaled = {"norm": 1 + 0.1 * noise, "embedding": 0.5 * noise}.get(kind)
        return (scaled if scaled is not None else noise / size[1] ** 0.5).to(dtype).cpu()

    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": tensor(v, h, kind="embedding")}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "input_layernorm.weight": tensor(h, kind="norm"),
            p + "self_attn.q_proj.weight": tensor(q, h, kind="linear"),
            p + "self_attn.k_proj.weight": tensor(kv, h, kind="linear"),
            p + "self_attn.v_proj.weight": tensor(kv, h, kind="linear"),
            p + "self_attn.o_proj.weight": tensor(h, q, kind="linear"),
            p + "post_attention_layernorm.weight": tensor(h, kind="norm"),
            p + "mlp.gate_proj.weight": tensor(f, h, kind="linear"),
            p + "mlp.up_proj.weight": tensor(f, h, kind="linear"),
            p + "mlp.down_proj.weight": tensor(h, f, kind="linear"),
        })
        save_file(shard, os.path.join(folder, f"model-{i:05d}.safetensors"))  # one shard a layer: bounded memory
        shard = {}
    shard.update({"model.norm.weight": tensor(h, kind="norm"), "lm_head.weight": tensor(v, h, kind="embedding")})
    save_file(shard, os.path.join(folder, "model-final.safetensors"))
    open(os.path.join(folder, "done"), "w").close()
    return folder


def generate(folder: str, tp: int, dtype: str, out: str) -> None:
    """(In its own process.) Greedy tokens and top-5 logprobs of the fixed prompts, to `out`; and
    the greedy tokens without logprobs (at TP > 1 picked from the ranks' vocabulary ranges)."""
    import torch

    from pagedllm import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 32000, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    llm = LLM(folder, tensor_parallel_size=tp, dtype=dtype, skip_tokenizer_init=True, gpu_memory_utilization=0.85,
              max_model_len=4096, max_num_seqs=16)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True), use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    rows = [
        {"tokens": o.outputs[0].token_ids, "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
         "argmax_tokens": p.outputs[0].token_ids}
        for o, p in zip(outputs, plain)
    ]
    llm.engine.core.shutdown()
    with open(out, "w") as f:
        json.dump(rows, f)


def compare(split: list[dict], single: list[dict], exact: bool) -> tuple[bool, list[dict]]:
    """check_logprobs_close (vLLM): equal, or a first difference that is a near-tie on both
    sides; with `exact`, equal tokens and logprobs within 1e-3."""
    ok, report = True, []
    for i, (a, b) in enumerate(zip(split, single)):
        n = len(a["tokens"])
        first = next((j for j in range(n) if a["tokens"][j] != b["tokens"][j]), n)
        near_tie = first == n or (str(a["tokens"][first]) in b["logprobs"][first] and str(b["tokens"][first]) in a["logprobs"][first])
        drift = max((abs(a["logprobs"][j][str(a["tokens"][j])] - b["logprobs"][j][str(b["tokens"][j])]) for j in range(first)), default=0.0)
        passed = (first == n and drift < 1e-3) if exact else near_tie
        ok &= passed
        report.append({"prompt_tokens": PROMPT_LENS[i], "equal_tokens": first, "of": n, "max_logprob_drift": round(drift, 4), "pass": passed})
    return ok, report


def check_equal(name: str, dtype: str, workdir: str, out_dir: str, num_layers: int | None, split: int = 2) -> bool:
    folder = os.path.join(workdir, f"tp-{name}-{num_layers or 'all'}")
    _python("-c", f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); import gpu_tp_bench as b; "
                  f"b.write_llama_checkpoint({name!r}, {folder!r}, {num_layers!r})")
    results = {}
    for tp in (1, split):
        path = os.path.join(workdir, f"{name}-tp{tp}.json")
        _python(os.path.abspath(__file__), "generate", "--folder", folder, "--tp", str(tp), "--dtype", dtype, "--result", path)
        with open(path) as f:
            results[tp] = json.load(f)
    ok, report = compare(results[split], results[1], exact=dtype == "float32")
    same_engine = all(r["argmax_tokens"] == r["tokens"] for r in results[split])  # shards vs full logits
    ok &= same_engine
    line = {"check": f"tp{split}_vs_tp1_{name}", "dtype": dtype, "layers": num_layers, "pass": ok,
            "argmax_from_shards_equal": same_engine, "prompts": report}
    _write(out_dir, "tp_equal.jsonl", line)
    print(f"{'PASS' if ok else 'FAIL'} TP={split} vs TP=1, {name} {dtype}: " + ", ".join(f"{r['equal_tokens']}/{r['of']}" for r in report)
          + f"; TP={split} greedy from shards = from full logits: {same_engine}", flush=True)
    return ok


# -- 3: offline speed ------------------------------------------------------------------------------


def bench_tp(out_dir: str, quick: bool, vllm_site: str | None) -> None:
    """TP=1, TP=2, and TP=2 with the fused all-reduce + norm switched off, each in one process
    (throughput then latency); with vllm_site, vLLM at the same TP size runs first in the first
    two (`--peer vllm`: the same token ids, its ratio in our JSON line)."""
    rows = [("tp1", 1, {}), ("tp2", 2, {}), ("tp2_unfused", 2, {"PAGEDLLM_FUSED_ALL_REDUCE_NORM": "0"})]
    for label, tp, env in rows:
        peer = ["--peer", "vllm", "--vllm-site", vllm_site] if vllm_site and not env else ["--peer", "none"]
        extra = ["--num-prompts", "64"] if quick else []
        _python("-m", "pagedllm.benchmarks.offline", "all", "--model-config", "llama-8b", "--tensor-parallel-size", str(tp),
                *peer, "--gpu-memory-utilization", "0.85", "--output-json", os.path.join(out_dir, f"tp_bench_{label}.jsonl"), *extra,
                check=False, env=env, timeout=420 if vllm_site else 180)


# -- 4: data parallelism through the server ------------------------------------------------------


def bench_dp(out_dir: str, workdir: str, quick: bool) -> None:
    from pagedllm.benchmarks.server_process import free_port, start_server
    from pagedllm.benchmarks.workloads import write_config_folder

    folder = write_config_folder("smollm2-135m", workdir)
    figures = {}
    for size, api_servers in ((1, 1), (1, 2), (2, 1), (2, 2)):
        port = free_port()
        server = start_server([folder, "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "2048",
                               "--data-parallel-size", str(size), "--api-server-count", str(api_servers)], port)
        try:
            result_path = os.path.join(workdir, f"dp{size}_api{api_servers}.json")
            num_prompts = "256" if quick else "3072"
            _python("-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                    "--num-prompts", num_prompts, "--random-input-len", "256", "--random-output-len", "256",
                    "--vocab-size", "49152", "--request-rate", "inf", "--client-processes", "16", "--output-json", result_path)
            with open(result_path) as f:
                result = json.load(f)
            figures[size, api_servers] = result["output_token_throughput"]
            _write(out_dir, "dp_bench.jsonl", {"data_parallel_size": size, "api_server_count": api_servers, "model": "smollm2-135m", **{
                k: result[k] for k in ("completed", "failed", "duration_s", "output_token_throughput", "total_token_throughput",
                                       "request_throughput", "ttft_ms", "tpot_ms")
            }})
        finally:
            server.terminate()
            server.wait(60)
    ratio = figures[2, 2] / figures[1, 1]
    ratio_same_api_servers = figures[2, 2] / figures[1, 2]
    _write(out_dir, "dp_bench.jsonl", {
        "dp2_api2_over_dp1_api1_output_throughput": round(ratio, 3),
        "dp2_api2_over_dp1_api2_output_throughput": round(ratio_same_api_servers, 3),
        "dp2_api1_over_dp1_api1_output_throughput": round(figures[2, 1] / figures[1, 1], 3),
        "target": 1.8,
    })
    print(f"DP=2 (2 API servers) / DP=1 output throughput through the server: {ratio:.2f}x over 1 API server, "
          f"{ratio_same_api_servers:.2f}x over 2 (target 1.8x)", flush=True)


# -- plumbing ------------------------------------------------------------------------------------


def _python(*args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PAGEDLLM_NO_PROGRESS": "1", **(env or {})}
    try:
        done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"TIMEOUT after {timeout:.0f} s: {' '.join(args[:4])} ...", flush=True)
        if check:
            raise
        return
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited with code {done.returncode}")


def _write(out_dir: str, name: str, line: dict) -> None:
    with open(os.path.join(out_dir, name), "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=["all", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where the JSON lines go (default: $OUT, else .)")
    parser.add_argument("--workdir", default=None, help="checkpoints and scratch files (default: a new temporary folder)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: equal-small, equal-8b, bench, dp")
    parser.add_argument("--quick", action="store_true", help="fewer layers and requests: a smoke test of the script")
    parser.add_argument("--split", type=int, default=2, help="equal-small, equal-8b: the TP size compared with TP=1 (default: 2)")
    parser.add_argument("--vllm-site", default=None,
                        help="bench: vLLM 0.26.0 unpacked here (scripts/gpu_vllm_parts.sh) runs beside TP=1 and TP=2")
    parser.add_argument("--folder"), parser.add_argument("--tp", type=int), parser.add_argument("--dtype")
    parser.add_argument("--result")
    opts = parser.parse_args()
    if opts.step == "generate":
        generate(opts.folder, opts.tp, opts.dtype, opts.result)
        return 0
    os.makedirs(opts.out, exist_ok=True)
    workdir = opts.workdir or tempfile.mkdtemp(prefix="gpu-tp-bench-")
    skip = set(filter(None, opts.skip.split(",")))
    ok = True
    steps = [
        ("equal-small", lambda: check_equal("small", "float32", workdir, opts.out, None, opts.split)),
        ("equal-8b", lambda: check_equal("llama-8b", "bfloat16", workdir, opts.out, 4 if opts.quick else None, opts.split)),
        ("bench", lambda: bench_tp(opts.out, opts.quick, opts.vllm_site)),
        ("dp", lambda: bench_dp(opts.out, workdir, opts.quick)),
    ]
    for name, step in steps:
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        start = time.monotonic()
        try:
            ok &= step() is not False
        except Exception as e:  # one step failing does not stop the others
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            _write(opts.out, "errors.jsonl", {"step": name, "error": f"{type(e).__name__}: {e}"})
            ok = False
        print(f"== {name} took {time.monotonic() - start:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
