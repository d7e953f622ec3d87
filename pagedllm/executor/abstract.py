"""The executor interface: the engine core hands it each step's SchedulerOutput and gets the
sampled tokens back, once, whatever number of processes (or machines) hold the model.

A step is launched in two calls, so the engine core can prepare the next step while the
device computes this one:

    execute_model(step N)        the forward pass is queued on the device
    sample_tokens(bitmask)       sampling is queued (grammar masks applied, when given);
                                 returns a StepFuture at once
    future.result()              waits for step N's tokens (the one host sync of a step)

Between execute_model and sample_tokens the engine may learn step N-1's tokens and build
step N's grammar bitmask from them; the forward pass of step N runs meanwhile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    import numpy as np

    from pagedllm.loader.model_loader import ModelInfo


class StepFuture(Protocol):
    def result(self) -> ModelRunnerOutput:
        """Wait for the step's sampled tokens."""


class Executor(ABC):
    model_info: ModelInfo  # config, tokenizer and EOS ids: what the engine core needs of the model
    num_blocks: int  # KV blocks, the same on every rank (the fewest any rank can hold)

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Launch one step's forward pass on every rank."""

    @abstractmethod
    def sample_tokens(self, grammar_bitmask: np.ndarray | None = None) -> StepFuture:
        """Launch sampling for the step just executed. grammar_bitmask: int32
        [rows, ceil(vocab / 32)], one row per request of the step in scheduled order
        (all bits set where a request has no grammar), or None."""

    def kv_cache_bytes(self, block_size: int) -> int:
        """The KV cache of one rank, in bytes."""
        from pagedllm.worker.kv_cache import bytes_per_block

        return self.num_blocks * bytes_per_block(self.model_info.config, block_size)

    @abstractmethod
    def check_health(self) -> None:
        """Raise RuntimeError (saying which worker and why) if steps can no longer run."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free what they hold. Idempotent."""


def make_executor(args: EngineArgs, max_num_batched_tokens: int) -> Executor:
    if args.distributed_executor_backend == "ray":  # even one rank: the model may be on another node
        from pagedllm.executor.ray_executor import RayExecutor

        return RayExecutor(args, max_num_batched_tokens)
    if args.tensor_parallel_size == 1:
        from pagedllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(args, max_num_batched_tokens)
    from pagedllm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(args, max_num_batched_tokens)
