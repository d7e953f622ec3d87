"""Executors run the model for the engine core: in this process (one rank) or in one worker
process per tensor-parallel rank. See docs/distributed.md."""

from pagedllm.executor.abstract import Executor, make_executor
from pagedllm.executor.uniproc import UniProcExecutor

__all__ = ["Executor", "UniProcExecutor", "make_executor"]
