"""Typed objects that cross the scheduler -> model runner -> scheduler boundary.

Plain data only (lists, numpy arrays): they are pickled between processes (tensor-parallel
workers, the engine process and the server), and the scheduler side imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagedllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent the first time a request is scheduled (and again after a preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    num_computed_tokens: int  # tokens whose KV is in the cache (or being written by the step in flight)
    num_scheduled_tokens: int  # tokens to run this step
    new_block_ids: list[int]  # appended to the runner's copy of the block table


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    scheduled: list[ScheduledRequest]  # in admission order
    dropped_request_ids: set[str]  # finished, aborted or preempted: the runner drops their state
    num_scheduled_tokens: int

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprobs at some positions: the chosen token first, then the top-k alternatives."""

    token_ids: np.ndarray  # [N, 1 + k] int64
    logprobs: np.ndarray  # [N, 1 + k] float32
    ranks: np.ndarray  # [N] int64, rank of the chosen token (1 = most likely)


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]  # only requests whose step ended at their last token
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
