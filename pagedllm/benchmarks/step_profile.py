"""`pagedllm bench profile`: per engine step, how long the GPU was busy against the wall time.

    pagedllm bench profile                                    # llama-1b, batch 64, 512-token prompts, 128 out
    pagedllm bench profile --model-config llama-8b --batch-size 1 --input-len 128

Drives the engine through its public API only (LLMEngine.add_request / step /
has_unfinished_requests), so it reads any engine loop, synchronous or with steps in flight.
The workload runs twice after a warm-up (different prompts, so no prefix-cache hits):
  1. unprofiled: the wall time of every step() call;
  2. under torch.profiler: each step() call is a `record_function` range; a step's window runs
     from the start of its call to the start of the next one. GPU busy = the union of the device
     activity (kernels, memcpy, memset) inside that window, whatever step launched it: with steps
     in flight the GPU work of step N lands in the window of call N+1, and that is the point: the
     share of wall time in which the GPU had nothing to do.
The profiler slows the host (a few µs per op), so the profiled wall is longer than the real one;
the summary gives the idle share against both, and the unprofiled one is the figure to quote.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from pagedllm.benchmarks import hardware, workloads
from pagedllm.benchmarks.engine_setup import add_engine_arguments, engine_options

STEP_LABEL = "pagedllm.bench.step"
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})  # Chrome-trace `cat` of device activity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)  # --model-config defaults to llama-1b here unless --model is given
    parser.add_argument("--batch-size", type=int, default=64, help="requests, all submitted at once (default: 64)")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens per request (default: 512)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--trace", default=None, help="also keep the Chrome trace (open in Perfetto) at this path")
    parser.add_argument("--top-kernels", type=int, default=10, help="list the N kernels with the most time in decode steps")
    parser.add_argument("--quiet-steps", action="store_true", help="print only the summary, not a line per step")


@dataclass(frozen=True)
class StepFigure:
    step: int
    phase: str  # "decode" once every request has shown a token before the step began, else "prefill"
    wall_ms: float  # profiled
    busy_ms: float | None  # None without a GPU
    idle_share: float | None


def main(args: argparse.Namespace) -> dict:
    from pagedllm import LLM

    gpu = torch.cuda.is_available()
    if args.model is None and args.model_config is None:
        args.model_config = "llama-1b"
    model, options = engine_options(args, gpu, tempfile.mkdtemp(prefix="pagedllm-profile-"))
    start = time.perf_counter()
    llm = LLM(model, **options)
    startup = time.perf_counter() - start
    vocab = workloads.MODEL_CONFIGS[args.model_config]["vocab_size"] if args.model_config else llm.get_tokenizer().vocab_size

    def prompts(seed: int) -> list[list[int]]:
        return workloads.random_prompts(args.batch_size, args.input_len, args.input_len, vocab, seed=seed)

    from pagedllm import SamplingParams

    llm.generate(prompts(10)[:8], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    plain = _drive(llm, prompts(11), args.output_len, "plain", gpu)
    profiled = _drive(llm, prompts(12), args.output_len, "profiled", gpu, profile=True)
    trace_path = args.trace or os.path.join(tempfile.mkdtemp(prefix="pagedllm-trace-"), "trace.json")
    profiled.profiler.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]

    windows = step_windows(events)
    if len(windows) != len(profiled.phases):
        raise RuntimeError(f"trace has {len(windows)} step ranges for {len(profiled.phases)} steps")
    busy = busy_per_window(events, windows) if gpu else [None] * len(windows)
    figures = [
        StepFigure(i, phase, round((end - begin) / 1000, 3), None if b is None else round(b / 1000, 3),
                   None if b is None else round(1 - b / (end - begin), 3))
        for i, (phase, (begin, end), b) in enumerate(zip(profiled.phases, windows, busy))
    ]
    summary = _summary(args, llm, figures, plain, startup, gpu, events, windows, trace_path)
    _report(args, figures, summary)
    return summary


@dataclass
class _Run:
    phases: list[str]
    walls: list[float]  # seconds per step() call
    profiler: torch.profiler.profile | None = None


def _drive(llm, prompts: list[list[int]], output_len: int, tag: str, gpu: bool, profile: bool = False) -> _Run:
    """Submit every prompt, then call step() until done, timing each call."""
    from pagedllm import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    started: dict[str, bool] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{tag}-{i}", prompt, params)
        started[f"profile-{tag}-{i}"] = False
    run = _Run([], [])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    if profile:
        run.profiler = torch.profiler.profile(activities=activities)
        run.profiler.__enter__()
    if gpu:
        torch.cuda.synchronize()
    try:
        last = time.perf_counter()
        while engine.has_unfinished_requests():
            phase = "decode" if all(started.values()) else "prefill"
            if profile:
                with torch.profiler.record_function(STEP_LABEL):
                    outputs = engine.step()
            else:
                outputs = engine.step()
            now = time.perf_counter()
            run.walls.append(now - last)
            run.phases.append(phase)
            last = now
            for output in outputs:
                if output.outputs and output.outputs[0].token_ids:
                    started[output.request_id] = True
        if gpu:
            torch.cuda.synchronize()
    finally:
        if profile:
            run.profiler.__exit__(None, None, None)
    return run


def step_windows(events: list[dict]) -> list[tuple[float, float]]:
    """(begin, end) in trace µs of every step: from its step() call to the next call's start."""
    starts = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("name") == STEP_LABEL and e.get("cat") == "user_annotation" and "dur" in e)
    return [(begin, starts[i + 1][0] if i + 1 < len(starts) else end) for i, (begin, end) in enumerate(starts)]


def busy_per_window(events: list[dict], windows: list[tuple[float, float]],
                    categories: frozenset[str] = DEVICE_CATEGORIES) -> list[float]:
    """µs of each window covered by at least one event of `categories` (overlaps counted once)."""
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in categories and "dur" in e)
    merged: list[list[float]] = []
    for begin, end in intervals:
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    busy, i = [], 0
    for begin, end in windows:
        while i < len(merged) and merged[i][1] <= begin:
            i += 1
        total, j = 0.0, i
        while j < len(merged) and merged[j][0] < end:
            total += min(end, merged[j][1]) - max(begin, merged[j][0])
            j += 1
        busy.append(total)
    return busy


def top_kernels(events: list[dict], windows: list[tuple[float, float]], n: int) -> list[dict]:
    """The kernels with the most device time starting inside `windows`."""
    times: dict[str, list[float]] = {}
    bounds = sorted(windows)
    begins = [b for b, _ in bounds]
    for e in events:
        if e.get("cat") != "kernel" or "dur" not in e:
            continue
        i = bisect.bisect_right(begins, e["ts"]) - 1
        if i >= 0 and e["ts"] < bounds[i][1]:
            times.setdefault(e["name"], []).append(e["dur"])
    ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [dict(kernel=name[:100], calls=len(d), total_ms=round(sum(d) / 1000, 3)) for name, d in ranked]


def _summary(args, llm, figures, plain: _Run, startup, gpu, events, windows, trace_path) -> dict:
    decode = [f for f in figures if f.phase == "decode"]
    plain_decode = [w * 1000 for w, p in zip(plain.walls, plain.phases) if p == "decode"]
    summary = dict(
        kind="profile-summary", model=args.model_config or args.model, machine=hardware.describe("cuda" if gpu else "cpu"),
        batch_size=args.batch_size, input_len=args.input_len, output_len=args.output_len, startup_s=round(startup, 2),
        steps=len(figures), decode_steps=len(decode),
        decode_wall_ms_median=_median([f.wall_ms for f in decode]),
        decode_wall_ms_unprofiled_median=_median(plain_decode),
        unprofiled_total_s=round(sum(plain.walls), 3), trace=trace_path,
    )
    if gpu and decode:
        busy = _median([f.busy_ms for f in decode])
        summary.update(
            decode_busy_ms_median=busy,
            decode_idle_share_median=_median([f.idle_share for f in decode]),
            decode_idle_share_vs_unprofiled=round(1 - busy / summary["decode_wall_ms_unprofiled_median"], 3),
            # A check on the clocks: device time the step windows miss (before the first step or
            # after the last) should be ~0; if not, the windows and kernels disagree on time.
            device_ms_outside_steps=round((sum(busy_per_window(events, [(-1e30, 1e30)]))
                                           - sum(busy_per_window(events, windows))) / 1000, 3),
            top_decode_kernels=top_kernels(events, [w for w, f in zip(windows, figures) if f.phase == "decode"],
                                           args.top_kernels),
        )
    return summary


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _report(args, figures: list[StepFigure], summary: dict) -> None:
    lines = [json.dumps(dict(kind="profile-step", model=summary["model"], **asdict(f))) for f in figures]
    if not args.quiet_steps:
        print("step  phase    wall ms   GPU busy ms  GPU idle", flush=True)
        for f in figures:
            busy = "-" if f.busy_ms is None else f"{f.busy_ms:9.3f}"
            idle = "-" if f.idle_share is None else f"{f.idle_share:6.1%}"
            print(f"{f.step:4d}  {f.phase:7s} {f.wall_ms:9.3f}   {busy:>11}  {idle:>8}", flush=True)
    s = summary
    print(f"{s['model']} batch {s['batch_size']} ({s['input_len']} in, {s['output_len']} out) on {s['machine']}: "
          f"{s['decode_steps']} decode steps, wall {s['decode_wall_ms_unprofiled_median']} ms/step unprofiled "
          f"({s['decode_wall_ms_median']} ms profiled)", flush=True)
    if "decode_busy_ms_median" in s:
        print(f"  GPU busy {s['decode_busy_ms_median']} ms/step: GPU idle {s['decode_idle_share_median']:.1%} of each "
              f"profiled step, {s['decode_idle_share_vs_unprofiled']:.1%} of the unprofiled one "
              f"(device time outside the steps: {s['device_ms_outside_steps']} ms)", flush=True)
        for k in s["top_decode_kernels"]:
            print(f"    {k['total_ms']:9.3f} ms  {k['calls']:6d} calls  {k['kernel']}", flush=True)
    else:
        print("  no GPU here: wall times only", flush=True)
    print(json.dumps(s), flush=True)
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.write("".join(line + "\n" for line in lines) + json.dumps(s) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    main(parser.parse_args())
