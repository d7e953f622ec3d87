"""A torch.profiler trace of some steps of a worker process (tensor-parallel ranks run outside
the engine core, where `pagedllm bench profile` cannot see them).

    PAGEDLLM_TORCH_PROFILER_DIR=/tmp/traces PAGEDLLM_PROFILE_STEPS=200:240 pagedllm serve ... -tp 2

Each rank records steps [200, 240) (counted by launches) and writes rank<r>.json, a Chrome trace
(open in Perfetto). Launches and finishes are labelled, so scripts/trace_summary.py can split the
GPU's busy time by step.
"""

from __future__ import annotations

import logging
import os

import torch

from pagedllm import envs

logger = logging.getLogger("pagedllm")

LAUNCH_LABEL = "pagedllm.worker.launch"
FINISH_LABEL = "pagedllm.worker.finish"


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
        first, stop = (int(x) for x in envs.PAGEDLLM_PROFILE_STEPS.split(":"))
        os.makedirs(folder, exist_ok=True)
        return cls(folder, rank, first, stop)

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
