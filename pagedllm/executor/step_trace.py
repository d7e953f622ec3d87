"""What some steps of a worker process cost (tensor-parallel ranks run outside the engine core,
where `pagedllm bench profile` cannot see them). Two ways, each for steps PAGEDLLM_PROFILE_STEPS:

    PAGEDLLM_TORCH_PROFILER_DIR=/tmp/traces PAGEDLLM_PROFILE_STEPS=200:240 pagedllm serve ... -tp 2
    PAGEDLLM_STEP_GAPS_DIR=/tmp/gaps PAGEDLLM_PROFILE_STEPS=200:240 pagedllm serve ... -tp 2

StepTrace: each rank records steps [200, 240) (counted by launches) and writes rank<r>.json, a
Chrome trace (open in Perfetto). Launches and finishes are labelled, so scripts/trace_summary.py
can split the GPU's busy time by step. The profiler slows the host, so a host-bound step looks
worse under it than it is.

StepGaps: no profiler, two CUDA events a step, in the workers and (as rank 0) in the engine core
of one rank. Each rank writes rank<r>_gaps.json: per step the device's span from the step's
first queued work to its last, the device's idle time before the step (waiting for the host to
queue it: the host set the pace), the host's time to queue it, its wait for the step to finish,
and the time from that finish to the next step's arrival (the driver's turn and the pipes).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

import torch

from pagedllm import envs

logger = logging.getLogger("pagedllm")

LAUNCH_LABEL = "pagedllm.worker.launch"
FINISH_LABEL = "pagedllm.worker.finish"


def _steps_to_record(folder: str) -> tuple[int, int]:
    """(first, stop) of PAGEDLLM_PROFILE_STEPS, once `folder`, where the files go, exists."""
    os.makedirs(folder, exist_ok=True)
    first, stop = (int(x) for x in envs.PAGEDLLM_PROFILE_STEPS.split(":"))
    return first, stop


class StepTrace:
    def __init__(self, folder: str, rank: int, first: int, stop: int) -> None:
        self.path = os.path.join(folder, f"rank{rank}.json")
        self.first, self.stop = first, stop
        self.launches = 0
        self.profiler: torch.profiler.profile | None = None

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        folder = envs.PAGEDLLM_TORCH_PROFILER_DIR
        if not folder:
            return None
        return cls(folder, rank, *_steps_to_record(folder))

    def on_launch(self) -> None:
        self.launches += 1
        if self.launches == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif self.launches == self.stop and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(self.path)
            logger.info("wrote the trace of steps %d..%d to %s", self.first, self.stop - 1, self.path)
            self.profiler = None


class StepGaps:
    def __init__(self, folder: str, rank: int, first: int, stop: int) -> None:
        self.path = os.path.join(folder, f"rank{rank}_gaps.json")
        self.rank, self.first, self.stop = rank, first, stop
        self.launches = 0
        self.steps: list[dict] = []  # per step: events and host times
        self.pending: dict[int, dict] = {}  # id of a launched step -> its row, until finished

    @classmethod
    def from_env(cls, rank: int) -> StepGaps | None:
        folder = envs.PAGEDLLM_STEP_GAPS_DIR
        if not folder or not torch.cuda.is_available():
            return None
        return cls(folder, rank, *_steps_to_record(folder))

    @property
    def recording(self) -> bool:
        return self.first <= self.launches < self.stop

    def launch_begins(self) -> None:
        self.launches += 1
        if self.recording:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.steps.append(dict(start=start, host_start=time.perf_counter()))

    def launch_ends(self, step: object) -> None:
        """step: what the launch returned, which finish() will wait for."""
        if self.recording:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.steps[-1].update(end=end, host_launch_ms=1e3 * (time.perf_counter() - self.steps[-1]["host_start"]))
            self.pending[id(step)] = self.steps[-1]
        elif self.launches == self.stop and self.steps:
            self._write()

    def waited(self, step: object, seconds: float) -> None:
        """The host's wait in finish() for a launched step."""
        row = self.pending.pop(id(step), None)
        if row is not None:
            row["host_wait_ms"] = 1e3 * seconds
            row["finished_at"] = time.perf_counter()

    def _write(self) -> None:
        torch.cuda.synchronize()
        rows = []
        for before, step in zip([None, *self.steps], self.steps):
            row = dict(device_ms=step["start"].elapsed_time(step["end"]), host_launch_ms=step["host_launch_ms"],
                       host_wait_ms=step.get("host_wait_ms"))
            if before is not None:  # the start event fires when the device gets to it: idle since the last step's end
                row["device_idle_before_ms"] = before["end"].elapsed_time(step["start"])
            later = [s["host_start"] for s in self.steps if s["host_start"] > step.get("finished_at", float("inf"))]
            if later:  # from this step's answer to the next step's arrival: the driver's turn (and the pipes')
                row["host_until_next_ms"] = 1e3 * (later[0] - step["finished_at"])
            rows.append(row)
        keys = ("device_ms", "device_idle_before_ms", "host_launch_ms", "host_wait_ms", "host_until_next_ms")
        medians = {k: statistics.median(r[k] for r in rows if r.get(k) is not None)
                   for k in keys
                   if any(r.get(k) is not None for r in rows)}
        with open(self.path, "w") as f:
            json.dump(dict(rank=self.rank, steps=f"{self.first}:{self.stop}", medians=medians, rows=rows), f, indent=1)
        logger.info("rank %d, steps %d..%d, medians: %s", self.rank, self.first, self.stop - 1,
                    ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
        self.steps, self.pending = [], {}
