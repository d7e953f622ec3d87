"""When the events of one request happened (time.monotonic(), comparable across the
server and engine processes of one machine), for the latency metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestTiming:
    arrival: float  # the server accepted it
    num_prompt_tokens: int
    scheduled: float | None = None  # first admitted into a step
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    num_generation_tokens: int = 0  # over all n completions
    num_steps_with_tokens: int = 0  # decode positions of the longest completion, for TPOT

    def record_tokens(self, now: float, num_tokens: int, longest_completion: int) -> None:
        if num_tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.num_generation_tokens += num_tokens
        self.num_steps_with_tokens = longest_completion

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else max(self.scheduled - self.arrival, 0.0)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def time_per_output_token(self) -> float | None:
        """Mean gap between tokens after the first; None with fewer than two tokens."""
        if self.first_token is None or self.last_token is None or self.num_steps_with_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.num_steps_with_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival
