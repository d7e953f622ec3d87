"""EngineCore: the model, the KV cache and the scheduler; one step at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.config import CacheConfig, EngineArgs, SchedulerConfig
from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.interface import EngineCoreOutput
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.executor import UniProcExecutor, make_executor
from pagedllm.worker.kv_cache import bytes_per_block
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger("pagedllm")


@dataclass(frozen=True)
class EngineInfo:
    """What a front end needs to know about a running core (it may live in another process)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    cache: CacheConfig


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; the prefix-cache and preemption figures are running totals."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int


class EngineCore:
    def __init__(self, args: EngineArgs) -> None:
        device = args.resolved_device
        default_budget = 8192 if device.startswith("cuda") else 2048
        max_num_batched_tokens = args.max_num_batched_tokens or max(default_budget, args.max_num_seqs)
        # The model, in this process or in one worker process per tensor-parallel rank.
        self.executor = make_executor(args, max_num_batched_tokens)
        model = self.executor.model_info  # config, tokenizer, EOS ids (the weights may be elsewhere)
        self.tokenizer = model.tokenizer
        cache = CacheConfig(args.block_size, self.executor.num_blocks, args.enable_prefix_caching)
        max_model_len = _fit_max_model_len(model.config.max_model_len, cache, args)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
            ),
            KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching),
        )
        self.info = EngineInfo(
            model_name=args.served_model_name or model.config.name,
            max_model_len=max_model_len,
            vocab_size=model.config.vocab_size,
            eos_token_ids=frozenset(model.eos_token_ids),
            cache=cache,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s); max_model_len %d; prefix caching %s",
            cache.num_blocks,
            cache.block_size,
            cache.num_tokens,
            cache.num_blocks * bytes_per_block(model.config, cache.block_size) / 2**30,
            device,
            max_model_len,
            "on" if cache.enable_prefix_caching else "off",
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort(request_ids)

    def step(self, while_running: Callable[[], None] | None = None) -> list[EngineCoreOutput]:
        """schedule -> execute -> update. `while_running` is called while the device
        computes the step (the front end processes the previous step's outputs there)."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.empty:
            if while_running is not None:
                while_running()
            return []
        runner_output = self.executor.execute(scheduler_output, while_running)
        return self.scheduler.update(scheduler_output, runner_output)

    @property
    def runner(self) -> ModelRunner:
        """The in-process model runner (tensor_parallel_size 1), for tests and benchmarks."""
        if not isinstance(self.executor, UniProcExecutor):
            raise AttributeError("with tensor_parallel_size > 1 the model runners live in the worker processes")
        return self.executor.runner

    def check_health(self) -> None:
        """Raise RuntimeError if the model's workers can no longer run steps."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.num_queries,
            prefix_cache_hits=kv.num_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )


def _fit_max_model_len(max_model_len: int, cache: CacheConfig, args: EngineArgs) -> int:
    """A request of max_model_len tokens must fit in the cache on its own."""
    if max_model_len <= cache.num_tokens:
        return max_model_len
    if args.max_model_len is not None:
        raise ValueError(
            f"max_model_len {max_model_len} needs {max_model_len} tokens of KV cache, but the cache holds "
            f"{cache.num_tokens}: raise kv_cache_memory / gpu_memory_utilization or lower max_model_len"
        )
    logger.warning("the KV cache holds %d tokens: lowering max_model_len from %d to that", cache.num_tokens, max_model_len)
    return cache.num_tokens
