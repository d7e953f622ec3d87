"""Where a CPU engine step goes, per dtype: the throughput workload (64 requests of 16..256 tokens,
128 out, EOS ignored) on a random-weight model of a known shape, with each step's wall time, then
torch.profiler over one prefill step and two decode steps of 64 sequences. Dtypes alternate, so a
drifting machine slows them alike.

    OMP_NUM_THREADS=2 taskset -c 0,1 python scripts/cpu_dtype_profile.py [--dtypes float32 bfloat16] [--rounds 2]

Prints, per dtype and round: tok/s of the whole workload, prefill and decode step times; then the
profiles (ops by self CPU time) of the last round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks import workloads


def build(dtype: str, model_config: str, folder: str, **extra) -> LLM:
    path = workloads.write_config_folder(model_config, folder)
    return LLM(path, dtype=dtype, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, seed=0,
               async_scheduling="off", **extra)  # fmt: skip


def run_workload(llm: LLM, prompts: list[list[int]], out_len: int) -> tuple[float, list[float], list[float]]:
    """(seconds, prefill step walls, decode step walls): a step is prefill while any prompt is unfinished."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"w{time.monotonic_ns()}-{i}", p, params)
    prefill, decode, started = [], [], set()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        wall = time.perf_counter() - t
        (prefill if len(started) < len(prompts) else decode).append(wall)
        started.update(o.request_id for o in outputs)
    return time.perf_counter() - start, prefill, decode


def profile_steps(llm: LLM, prompts: list[list[int]], label: str) -> None:
    """One prefill step of these prompts, then two decode steps of them, each under the profiler."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{time.monotonic_ns()}-{i}", p, params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t
    print(f"\n=== {label}: first step (prefill) {wall * 1e3:.1f} ms under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50))
    for _ in range(3):  # to the decodes
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        engine.step()
        engine.step()
        wall = time.perf_counter() - t
    print(f"\n=== {label}: two decode steps of {len(prompts)} sequences {wall * 1e3:.1f} ms under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50))
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--model-config", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    vocab = workloads.MODEL_CONFIGS[args.model_config]["vocab_size"]
    w = workloads.throughput(args.num_prompts, 16, 256, 128, vocab)
    folder = tempfile.mkdtemp()
    llms = {}
    for dtype in args.dtypes:
        t = time.perf_counter()
        llms[dtype] = build(dtype, args.model_config, folder)
        llms[dtype].generate(w.prompts[:8], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        print(f"{dtype}: loaded and warmed in {time.perf_counter() - t:.1f} s", flush=True)
    for r in range(args.rounds):
        for dtype, llm in llms.items():
            seconds, prefill, decode = run_workload(llm, w.prompts, 128)
            print(f"round {r} {dtype}: {w.num_output_tokens / seconds:.1f} tok/s ({seconds:.1f} s); prefill {len(prefill)} "
                  f"steps {sum(prefill):.2f} s; decode {len(decode)} steps, median {statistics.median(decode) * 1e3:.1f} ms, "
                  f"first {decode[0] * 1e3:.1f}, sum {sum(decode):.2f} s", flush=True)  # fmt: skip
    if not args.no_profile:
        for dtype, llm in llms.items():
            profile_steps(llm, w.prompts, dtype)


if __name__ == "__main__":
    main()
