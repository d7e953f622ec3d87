"""The executor interface: the engine core hands it each step's SchedulerOutput and gets the
sampled tokens back, once, whatever number of processes (or machines) hold the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.loader.model_loader import ModelInfo


class Executor(ABC):
    model_info: ModelInfo  # config, tokenizer and EOS ids: what the engine core needs of the model
    num_blocks: int  # KV cache blocks, the same on every rank (the fewest any rank can hold)

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput, while_running: Callable[[], None] | None = None) -> ModelRunnerOutput:
        """Run one step on every rank; `while_running` is called while the step computes."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise RuntimeError (saying which worker and why) if steps can no longer run."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free what they hold. Idempotent."""


def make_executor(args: EngineArgs, max_num_batched_tokens: int) -> Executor:
    if args.tensor_parallel_size == 1:
        from pagedllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(args, max_num_batched_tokens)
    from pagedllm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(args, max_num_batched_tokens)
