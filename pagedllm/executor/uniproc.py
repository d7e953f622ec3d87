"""One rank, in the engine core's own process: the model runner is called directly."""

from __future__ import annotations

from pagedllm.config import EngineArgs
from pagedllm.core.interface import SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture
from pagedllm.executor.step_trace import StepGaps
from pagedllm.loader.model_loader import load_model
from pagedllm.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, args: EngineArgs, max_num_batched_tokens: int) -> None:
        loaded = load_model(args)
        self.model_info = loaded.info
        self.runner = ModelRunner(loaded, args, max_num_batched_tokens)
        self.num_blocks = self.runner.num_blocks
        self.gaps = StepGaps.from_env(rank=0)  # the device's time a step, as the workers of TP > 1 measure it

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        if self.gaps is not None:
            self.gaps.launch_begins()
        self.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_bitmask=None) -> StepFuture:
        step = self.runner.sample_tokens(grammar_bitmask)
        if self.gaps is not None:
            self.gaps.launch_ends(step)
        return step

    def check_health(self) -> None:
        pass  # it runs in this process: if it is gone, so are we

    def shutdown(self) -> None:
        pass
