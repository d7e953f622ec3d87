"""Turns a user's prompt and SamplingParams into EngineCoreRequests (tokenize, resolve
defaults, refuse what can never fit)."""

from __future__ import annotations

from dataclasses import replace

from pagedllm.core.limits import check_fits
from pagedllm.engine.messages import EngineCoreRequest, EngineInfo
from pagedllm.sampling_params import SamplingParams

Prompt = str | list[int]


class InputProcessor:
    def __init__(self, tokenizer, info: EngineInfo) -> None:
        self.tokenizer = tokenizer
        self.info = info

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("the engine was started with skip_tokenizer_init: give prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a non-empty string or a non-empty list of token ids")
        vocab = self.info.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return None, list(prompt)

    def resolve_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        """max_tokens filled in, the model's EOS ids attached, and the length checked."""
        max_len = self.info.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max(max_len - num_prompt_tokens, 1)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.info.eos_token_ids))
        check_fits(num_prompt_tokens, max_tokens, max_len)
        vocab = self.info.vocab_size
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias token ids {outside[:5]} are outside the vocabulary [0, {vocab})")
        return replace(params, max_tokens=max_tokens, all_stop_token_ids=stop_ids)

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[EngineCoreRequest]:
        """One core request per completion; n > 1 fans out into children `i_<id>`."""
        if params.n == 1:
            return [EngineCoreRequest(request_id, prompt_ids, params)]
        return [EngineCoreRequest(child_id(request_id, i), prompt_ids, params.for_child(i)) for i in range(params.n)]


def child_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"
