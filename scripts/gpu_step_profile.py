"""Where a decode step's time goes on the GPU, async scheduling on and off: host time per
phase of EngineCore.step (perf_counter around each call) and torch.profiler's table of the
host-side CUDA runtime calls (a hidden sync shows as cudaStreamSynchronize / cudaEventSynchronize
/ cudaHostAlloc time).

    PYTHONPATH=. python scripts/gpu_step_profile.py --model-config llama-1b --batch 64
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import tempfile
import time

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks import workloads


def timed(obj, name, totals):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[name] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="llama-1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["on", "off"])
    parser.add_argument("--torch-profile", action="store_true", help="also torch.profiler's table (slows the host)")
    args = parser.parse_args()
    folder = workloads.write_config_folder(args.model_config, tempfile.mkdtemp())
    for mode in args.modes:
        llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, async_scheduling=mode,
                  gpu_memory_utilization=0.5)
        w = workloads.latency(args.batch, 512, args.steps, llm.engine.core.info.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        llm.generate(w.prompts[:8], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        engine, core = llm.engine, llm.engine.core
        totals: dict[str, float] = collections.defaultdict(float)
        timed(core.scheduler, "schedule", totals)
        timed(core.scheduler, "update", totals)
        timed(core.executor, "execute_model", totals)
        timed(core.executor, "sample_tokens", totals)
        timed(engine.outputs, "process", totals)
        timed(core, "_finish_in_flight", totals)
        timed(core.runner, "_prepare", totals)
        if core.runner.graphs is not None:
            timed(core.runner.graphs, "run", totals)
        for i, p in enumerate(w.prompts):
            engine.add_request(f"w{i}", p, params)
        torch.cuda.synchronize()
        prefill_times = []
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.requests.values()):
            t = time.perf_counter()
            engine.step()  # prefill
            prefill_times.append(round((time.perf_counter() - t) * 1000, 2))
        torch.cuda.synchronize()
        print(f"prefill steps (ms, host time of each step() call): {prefill_times}; phases so far:",
              {k: round(v * 1000, 1) for k, v in totals.items()})
        for k in totals:
            totals[k] = 0.0
        steps = 0
        start = time.perf_counter()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) if args.torch_profile else contextlib.nullcontext() as prof:
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        print(f"\n==== {args.model_config} batch {args.batch} async={mode}: {steps} steps, {wall / steps * 1000:.2f} ms/step")
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {k:16s} {v / steps * 1000:7.3f} ms/step")
        if prof is None:
            del llm, engine, core
            continue
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1000 / steps
        print(f"  GPU kernel time {gpu:.3f} ms/step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48))
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
