"""The model runner's copy of a request: its tokens, its row of the block tables, and its
sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.interface import NewRequestData
from pagedllm.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    sampling_params: SamplingParams
    row: int  # of the runner's BlockTables
    # Tokens sampled on the device whose ids have not been read back yet (0 or 1): the next
    # step takes its input token from the device.
    num_pending: int = 0

    @classmethod
    def from_new(cls, new: NewRequestData, row: int) -> RunnerRequestState:
        return cls(
            request_id=new.request_id,
            token_ids=new.prompt_token_ids + new.output_token_ids,
            num_prompt_tokens=len(new.prompt_token_ids),
            sampling_params=new.sampling_params,
            row=row,
        )

    def step_seed(self) -> int | None:
        """Seed of the draw for the next token: a function of the request's seed and the
        token's position, so a seeded request samples the same tokens whatever shares its
        batch, and also after a preemption."""
        seed = self.sampling_params.seed
        return None if seed is None else hash((seed, self.num_output_tokens)) & (2**63 - 1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens read back so far (all of them in synchronous steps)."""
        return self.token_ids[self.num_prompt_tokens :]
