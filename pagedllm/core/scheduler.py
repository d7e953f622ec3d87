"""Continuous batching: which tokens of which requests run in the next step.

Every request has `num_computed_tokens` (KV in the cache) and `num_tokens`
(prompt + generated). A step gives each running request the tokens it still
lacks, within a token budget: 1 for a decode, up to the whole remainder for a
prompt, so prefill chunks and decodes share a step (chunked prefill). Running
requests go first, in admission order; waiting ones are admitted while budget,
sequence slots and KV blocks last. When blocks run out, the most recently
admitted running request is preempted by recompute: its blocks are freed and it
goes back to the front of the waiting queue (the prefix cache usually hands most
of its blocks back when it returns).

The scheduler asks the KVCacheManager for room; it never touches blocks itself.
"""

from __future__ import annotations

from collections import deque

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.interface import (
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.limits import check_fits


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._dropped: set[str] = set()
        self.num_preemptions = 0
        # Unfinished requests whose sampling reads their whole output (penalties): while there
        # are any, the engine finishes each step before scheduling the next.
        self.num_history_dependent = 0

    # -- admission ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, refusing up front one that could never run to its end."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        check_fits(request.num_prompt_tokens, request.max_tokens, self.config.max_model_len)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_history_dependent += request.sampling_params.needs_output_history

    def abort(self, request_ids: list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End these requests now (unknown ids are ignored) and free their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, status)

    # -- the step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        new_requests: list[NewRequestData] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._will_finish_by_length(request):  # its in-flight step ends it: nothing to run
                i += 1
                continue
            num_new = min(request.num_tokens + request.num_output_placeholders - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while (new_block_ids := self.kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request.request_id, request.num_computed_tokens, num_new, new_block_ids))
                self._advance(request, num_new)
                budget -= num_new
                i += 1

        # New work waits while anything had to be preempted: there is no room for it.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            block_ids = self.kv.allocate_slots(request, num_new, cached)
            if block_ids is None:
                break
            self.waiting.popleft()
            self.kv.record_lookup(request.num_tokens, num_cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            new_requests.append(
                NewRequestData(
                    request.request_id,
                    request.prompt_token_ids,
                    request.output_token_ids,
                    request.sampling_params,
                )
            )
            scheduled.append(ScheduledRequest(request.request_id, num_cached, num_new, block_ids))
            self._advance(request, num_new)
            budget -= num_new

        dropped, self._dropped = self._dropped, set()
        return SchedulerOutput(
            new_requests=new_requests,
            scheduled=scheduled,
            dropped_request_ids=dropped,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
        )

    def update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append the step's sampled tokens and finish what should stop. (The step's tokens
        were counted as computed when it was scheduled.)

        A request may have finished or been aborted since the step was scheduled (its next
        step was already in flight): its token is dropped here and reaches no output. One
        preempted since keeps its token: it was sampled from a complete context."""
        outputs: list[EngineCoreOutput] = []
        requests, sampled, logprobs = self.requests, runner_output.sampled_token_ids, runner_output.logprobs
        all_prompt_logprobs = runner_output.prompt_logprobs
        for s in scheduler_output.scheduled:
            request = requests.get(s.request_id)
            if request is None:
                continue  # finished or aborted since it was scheduled
            prompt_logprobs = all_prompt_logprobs.get(s.request_id) if all_prompt_logprobs else None
            token = sampled.get(s.request_id)
            if token is None:  # a prefill chunk that did not reach the end of the prompt
                if prompt_logprobs is not None:
                    outputs.append(EngineCoreOutput(s.request_id, [], prompt_logprobs=prompt_logprobs))
                continue
            if request.num_output_placeholders:
                request.num_output_placeholders -= 1
            request.all_token_ids.append(token)
            status = self._stop_status(request, token)
            outputs.append(
                EngineCoreOutput(
                    s.request_id,
                    [token],
                    logprobs.get(s.request_id) if logprobs else None,
                    prompt_logprobs,
                    status.value if status else None,
                    request.stop_reason,
                    max(request.num_cached_tokens, 0),
                )
            )
            if status is not None:
                self._finish(request, status)
        return outputs

    # -- helpers -----------------------------------------------------------------------------------

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        # The sampler masks stop tokens until min_tokens are out; check the same bound here.
        if request.num_output_tokens >= params.min_tokens and token in params.all_stop_token_ids:
            if token in params.stop_token_ids:
                request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _advance(self, request: Request, num_new: int) -> None:
        """Count the step's tokens as computed now, so the next step can be scheduled while
        this one runs; a step that reaches the last token samples one more (a placeholder
        until its id comes back)."""
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1

    def _will_finish_by_length(self, request: Request) -> bool:
        """The token in flight is the request's last (max_tokens or max_model_len)."""
        if not request.num_output_placeholders:
            return False
        num_tokens = request.num_tokens + request.num_output_placeholders
        return num_tokens - request.num_prompt_tokens >= request.max_tokens or num_tokens >= self.config.max_model_len

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # a token in flight still arrives, in update()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._dropped.add(request.request_id)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request.request_id)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        del self.requests[request.request_id]
        self._dropped.add(request.request_id)
        self.num_history_dependent -= request.sampling_params.needs_output_history

    # -- state -------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)
