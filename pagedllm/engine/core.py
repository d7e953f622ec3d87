"""EngineCore: the model, the KV cache and the scheduler, stepping with up to two steps in
flight (asynchronous scheduling).

    step():   schedule N+1 ──► launch N+1 ──► finish N (update) ──► (grammar masks) ──► sample N+1
    device:   ... N computes ........ N+1 computes ...............................

Step N+1 is scheduled as if every request of step N produced its token; the sampled ids stay
on the device and feed step N+1 there. Step N's tokens reach the scheduler in the same call,
one step late. A request that finishes in step N had a token for N+1 computed too: update()
drops it (it never reaches an output), and its blocks are free for steps launched after N+1.
Aborts arrive between steps (the front end calls abort() between calls of step()).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagedllm.config import CacheConfig, EngineArgs, SchedulerConfig
from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.interface import EngineCoreOutput, SchedulerOutput
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.messages import EngineCoreRequest, EngineInfo, EngineStats
from pagedllm.engine.structured_requests import StructuredRequests
from pagedllm.executor import UniProcExecutor, make_executor
from pagedllm.executor.abstract import StepFuture

logger = logging.getLogger("pagedllm")


@dataclass
class InFlightStep:
    scheduler_output: SchedulerOutput
    future: StepFuture


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
        self.async_scheduling = args.resolved_async_scheduling
        self.in_flight: InFlightStep | None = None
        # Ids of the requests the last step's scheduling admitted (a preempted one again when it
        # resumes): what a server needs for queue times, without walking its waiting queue.
        self.admitted: list[str] = []
        max_model_len = _fit_max_model_len(model.config.max_model_len, cache, args)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
            ),
            KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching),
        )
        self.structured = StructuredRequests(self.tokenizer, model.config.vocab_size, frozenset(model.eos_token_ids))
        self.info = EngineInfo(
            model_name=args.served_model_name or model.config.name,
            max_model_len=max_model_len,
            vocab_size=model.config.vocab_size,
            eos_token_ids=frozenset(model.eos_token_ids),
            cache=cache,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB %s, %s); max_model_len %d; prefix caching %s",
            cache.num_blocks,
            cache.block_size,
            cache.num_tokens,
            self.executor.kv_cache_bytes(cache.block_size) / 2**30,
            str(model.config.cache_dtype).removeprefix("torch."),
            device,
            max_model_len,
            "on" if cache.enable_prefix_caching else "off",
        )

    def add_request(self, request: EngineCoreRequest) -> Request:
        """Queue a request (ValueError if it can never run); returns the scheduler's state of it."""
        core_request = Request(request.request_id, request.prompt_token_ids, request.sampling_params, request.arrival_time)
        if not self.structured.hold(core_request):  # a structured request waits for its grammar
            self.scheduler.add_request(core_request)
        return core_request

    def abort(self, request_ids: list[str]) -> None:
        """Between steps only. A request with a step in flight is freed now: steps run in
        order on the device, so nothing launched later can see its blocks before that step
        is done, and its token is dropped when the step is finished."""
        self.scheduler.abort(request_ids)
        self.structured.abort(request_ids)

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, why) of requests that ended without running (a grammar that did not compile)."""
        return self.structured.take_failed()

    def step(self) -> list[EngineCoreOutput]:
        """Launch the next step, then finish the one in flight and return its outputs."""
        if self.in_flight is not None and not self._can_overlap():
            outputs = self._finish_in_flight()  # this step's sampling needs its tokens first
        else:
            outputs = []
        self.structured.admit_ready(self.scheduler)  # requests whose grammar has compiled
        scheduler_output = self.scheduler.schedule()
        self.admitted = [new.request_id for new in scheduler_output.new_requests]
        if scheduler_output.empty:
            return outputs + self._finish_in_flight()
        self.executor.execute_model(scheduler_output)
        if not self._has_grammars(scheduler_output):
            future = self.executor.sample_tokens()
            outputs += self._finish_in_flight()
        else:  # its masks follow from the tokens of the step in flight: finish that one first
            outputs += self._finish_in_flight()
            future = self.executor.sample_tokens(self._grammar_bitmask(scheduler_output))
        self.in_flight = InFlightStep(scheduler_output, future)
        if not self.async_scheduling:
            outputs += self._finish_in_flight()
        return outputs

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        if self.in_flight is None:
            return []
        step, self.in_flight = self.in_flight, None
        outputs = self.scheduler.update(step.scheduler_output, step.future.result())
        self.structured.accept(outputs, self.scheduler)  # advance the grammars by the new tokens
        return outputs

    def _has_grammars(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether a request of the step samples under a grammar (structured outputs)."""
        return self.structured.has_grammars(scheduler_output)

    def _grammar_bitmask(self, scheduler_output: SchedulerOutput):
        """int32 [len(scheduler_output.scheduled), ceil(vocab / 32)]: each request's allowed
        tokens from the grammar state after its latest token (all bits set where it has no
        grammar). The tokens of the step just finished were accepted in _finish_in_flight."""
        return self.structured.bitmask(scheduler_output)

    def _can_overlap(self) -> bool:
        """Whether the next step can be scheduled before the one in flight is finished: not
        when a running request samples from its whole output so far (penalties)."""
        return not self.scheduler.num_history_dependent

    @property
    def runner(self):
        """The in-process model runner (tensor_parallel_size 1), for tests and benchmarks."""
        if not isinstance(self.executor, UniProcExecutor):
            raise AttributeError("with tensor_parallel_size > 1 the model runners live in the worker processes")
        return self.executor.runner

    def check_health(self) -> None:
        """Raise RuntimeError if the model's workers can no longer run steps."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.structured.shutdown()
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.in_flight is not None or self.scheduler.has_unfinished_requests() or self.structured.has_unfinished()

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
