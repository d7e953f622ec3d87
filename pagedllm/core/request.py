"""One sequence being generated, as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # prompt + generated tokens; the KV of the first num_computed_tokens is in the cache.
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Tokens sampled by a step still in flight: their ids are on the device, not yet here
    # (0 or 1; asynchronous scheduling runs the next step on them before they are known).
    num_output_placeholders: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit when first scheduled; -1 until then
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def max_tokens(self) -> int:
        """Output tokens allowed (max_tokens is resolved against max_model_len before adding)."""
        assert self.sampling_params.max_tokens is not None
        return self.sampling_params.max_tokens
