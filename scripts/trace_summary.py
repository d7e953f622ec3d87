"""Where a worker's steps go, from the trace PAGEDLLM_TORCH_PROFILER_DIR wrote (executor/step_trace.py).

    python scripts/trace_summary.py /tmp/traces/rank0.json

A step's window runs from one launch to the next. Per window: wall, GPU busy (union of device
activity), the host's time launching (inputs, graph replay, sampling calls) and finishing
(waiting for the tokens), and the GPU time of NCCL kernels. Medians, and the top kernels.
"""

from __future__ import annotations

import json
import statistics
import sys

from pagedllm.benchmarks.step_profile import busy_per_window, top_kernels
from pagedllm.executor.step_trace import FINISH_LABEL, LAUNCH_LABEL


def _spans(events: list[dict], name: str) -> list[tuple[float, float]]:
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == name and "dur" in e and e.get("cat") == "user_annotation")


def _inside(spans: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    return [sum(min(e, we) - max(b, wb) for b, e in spans if b < we and e > wb) for wb, we in windows]


def summarize(path: str) -> dict:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    launches = _spans(events, LAUNCH_LABEL)
    windows = [(launches[i][0], launches[i + 1][0]) for i in range(len(launches) - 1)]
    busy = busy_per_window(events, windows)
    nccl = [e for e in events if e.get("cat") == "kernel" and "nccl" in e.get("name", "").lower() and "dur" in e]
    nccl_busy = busy_per_window(nccl, windows, frozenset({"kernel"}))
    launch, finish = _inside(launches, windows), _inside(_spans(events, FINISH_LABEL), windows)

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs) / 1000, 3)

    walls = [e - b for b, e in windows]
    return dict(
        steps=len(windows), wall_ms=med(walls), gpu_busy_ms=med(busy), idle_share=round(1 - statistics.median(busy) / statistics.median(walls), 3),
        host_launch_ms=med(launch), host_finish_wait_ms=med(finish), nccl_kernel_ms=med(nccl_busy),
        nccl_kernels_per_step=round(len(nccl) / max(1, len(windows)), 1), top_kernels=top_kernels(events, windows, 8),
    )


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(path, json.dumps(summarize(path), indent=1))
