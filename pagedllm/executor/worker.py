"""One tensor-parallel rank: its shard of the weights and of the KV cache, and the steps the
driver sends it. Knows nothing about how it was started or how steps reach it, so the same
class runs in a process of MultiprocExecutor and in a Ray actor (RayExecutor)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace

import torch

from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from pagedllm.executor.step_trace import FINISH_LABEL, LAUNCH_LABEL, StepGaps, StepTrace
from pagedllm.loader.model_loader import load_model
from pagedllm.worker.model_runner import ModelRunner, PendingStep


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank needs to start (picklable: it crosses into the worker's process)."""

    args: EngineArgs
    rank: int
    max_num_batched_tokens: int
    store_host: str  # the driver's TCPStore, where the ranks meet
    store_port: int
    # The GPU index this rank uses among the visible ones: by default its rank; a Ray actor
    # sees only the GPU Ray gave it, as cuda:0.
    local_device_index: int | None = None

    @property
    def world_size(self) -> int:
        return self.args.tensor_parallel_size


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        device = spec.args.resolved_device
        if device.startswith("cuda"):
            index = spec.rank if spec.local_device_index is None else spec.local_device_index
            device = f"cuda:{index}"  # rank r on visible GPU r (choose GPUs with CUDA_VISIBLE_DEVICES)
            torch.cuda.set_device(device)
        else:  # N processes share the cores: threads beyond a fair share only contend
            torch.set_num_threads(max(1, _num_cpus() // spec.world_size))
        args = replace(spec.args, device=device, skip_tokenizer_init=True)  # the driver tokenizes
        self.rank = spec.rank
        self.tp = init_tensor_parallel(spec.rank, spec.world_size, spec.store_host, spec.store_port, device)
        self.runner = ModelRunner(load_model(args, self.tp), args, spec.max_num_batched_tokens, self.tp)
        self.trace = StepTrace.from_env(spec.rank)
        self.gaps = StepGaps.from_env(spec.rank)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def execute(self, scheduler_output: SchedulerOutput, grammar_bitmask=None) -> ModelRunnerOutput | None:
        """Every rank runs the step (the collectives need all of them); rank 0's output is the step's."""
        return self.finish(self.launch(scheduler_output, grammar_bitmask))

    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask=None) -> PendingStep:
        """Queue the step on the device and return at once; the next step may be launched
        before this one is finished (its sampled ids are fed to it on the device)."""
        if self.trace is not None:
            self.trace.on_launch()
        if self.gaps is not None:
            self.gaps.launch_begins()
        with self._span(LAUNCH_LABEL):
            self.runner.execute_model(scheduler_output)
            step = self.runner.sample_tokens(grammar_bitmask)
        if self.gaps is not None:
            self.gaps.launch_ends(step)
        return step

    def finish(self, step: PendingStep) -> ModelRunnerOutput | None:
        """Wait for a launched step (every rank: its requests' states advance); rank 0's output."""
        start = time.perf_counter() if self.gaps is not None else 0.0
        with self._span(FINISH_LABEL):
            output = step.result()
        if self.gaps is not None:
            self.gaps.waited(step, time.perf_counter() - start)
        return output if self.rank == 0 else None

    def shutdown(self) -> None:
        destroy_tensor_parallel()

    def _span(self, label: str) -> contextlib.AbstractContextManager:
        return torch.profiler.record_function(label) if self.trace is not None else contextlib.nullcontext()


def _num_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
