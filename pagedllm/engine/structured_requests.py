"""The engine core's side of structured outputs: requests wait here (outside the
scheduler) while their grammar compiles, and each step gets the bitmask of its
structured requests and advances their matchers by what they sampled.

    add_request ──► compiling ──ready──► scheduler.add_request
                        └──failed / timed out──► failed (the front end answers 400)
    step N+1 launched ──► step N finished: accept(outputs) advances the matchers
                     ──► has_grammars(N+1)? bitmask(N+1) ──► executor.sample_tokens(bitmask)

The forward pass of step N+1 runs on the device while step N's tokens are accepted and
the bitmask is filled on the host; only the sampling of N+1 waits for the mask (a step
without grammars samples at once).

The StructuredOutputManager (and xgrammar with it) is created at the first structured
request, so an engine that never sees one never loads them.
"""

from __future__ import annotations

import numpy as np

from pagedllm.core.interface import EngineCoreOutput, SchedulerOutput
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler

_IDLE_WAIT_S = 0.005  # an engine with only compiling requests waits this long per step


class StructuredRequests:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._manager = None
        self._compiling: dict[str, Request] = {}
        self._failed: list[tuple[str, str]] = []  # (request id, why)

    @property
    def manager(self):
        if self._manager is None:
            if self._tokenizer is None:
                raise ValueError("structured outputs need the tokenizer: start the engine without skip_tokenizer_init")
            from pagedllm.structured_output.manager import StructuredOutputManager

            self._manager = StructuredOutputManager(self._tokenizer, self._vocab_size, self._stop_token_ids)
        return self._manager

    def hold(self, request: Request) -> bool:
        """Start compiling a structured request's grammar and keep it; False for any other."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return False
        if request.request_id in self._compiling:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.manager.add_request(request.request_id, params)
        self._compiling[request.request_id] = request
        return True

    def admit_ready(self, scheduler: Scheduler) -> None:
        """Move requests whose grammar is ready to the scheduler; fail those that cannot compile."""
        if not self._compiling:
            return
        if not scheduler.has_unfinished_requests():
            self.manager.wait(_IDLE_WAIT_S)  # nothing else to do: don't spin
        for request_id, request in list(self._compiling.items()):
            if not self.manager.is_ready(request_id):
                continue
            del self._compiling[request_id]
            error = self.manager.error(request_id)
            if error is None:
                try:
                    scheduler.add_request(request)
                    continue
                except ValueError as e:
                    error = str(e)
            self.manager.remove(request_id)
            self._failed.append((request_id, error))

    def take_failed(self) -> list[tuple[str, str]]:
        failed, self._failed = self._failed, []
        return failed

    def has_grammars(self, scheduler_output: SchedulerOutput) -> bool:
        manager = self._manager
        return manager is not None and any(manager.has_request(s.request_id) for s in scheduler_output.scheduled)

    def bitmask(self, scheduler_output: SchedulerOutput) -> np.ndarray:
        """One row per scheduled request, in order (all ones without a grammar)."""
        return self.manager.fill_bitmask([s.request_id for s in scheduler_output.scheduled])

    def accept(self, outputs: list[EngineCoreOutput], scheduler: Scheduler) -> None:
        """Advance the matchers; a request whose grammar has ended stops (reason "stop")."""
        if self._manager is None:
            return
        manager = self._manager
        for out in outputs:
            if not manager.has_request(out.request_id):
                continue
            manager.accept_tokens(out.request_id, out.new_token_ids)
            if not out.finished and manager.is_terminated(out.request_id):
                scheduler.finish_requests([out.request_id], RequestStatus.FINISHED_STOPPED)
                out.finish_reason = RequestStatus.FINISHED_STOPPED.value
            if out.finished:
                manager.remove(out.request_id)

    def abort(self, request_ids: list[str]) -> None:
        if self._manager is None:
            return
        for request_id in request_ids:
            self._compiling.pop(request_id, None)
            self._manager.remove(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._compiling) or bool(self._failed)

    def shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
