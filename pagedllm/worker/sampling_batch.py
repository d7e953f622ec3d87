"""SamplingBatch from the runner's request states: per-row tensors, and the
optional parts (top-k, penalties, ...) only when some row uses them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedllm.layers.sampler import SamplingBatch
from pagedllm.worker.request_state import RunnerRequestState


def build_sampling_batch(states: list[RunnerRequestState], to_device: Callable[[torch.Tensor], torch.Tensor]) -> SamplingBatch:
    params = [s.sampling_params for s in states]

    def column(values, dtype=torch.float32):
        return to_device(torch.tensor(values, dtype=dtype))

    def optional(attr: str, off, dtype=torch.float32, replace_off=None):
        values = [getattr(p, attr) for p in params]
        if all(v == off for v in values):
            return None
        if replace_off is not None:
            values = [replace_off if v == off else v for v in values]
        return column(values, dtype)

    penalties = any(p.needs_output_history for p in params)
    # The engine runs such steps synchronously, so every output token is known here.
    assert not penalties or not any(s.num_pending for s in states), "penalties need the previous step's tokens"
    masked = {
        row: sorted(p.all_stop_token_ids)
        for row, (p, s) in enumerate(zip(params, states))
        if s.num_output_tokens < p.min_tokens and p.all_stop_token_ids
    }
    seeds = {row: seed for row, s in enumerate(states) if (seed := s.step_seed()) is not None}
    bias = [(row, token, value) for row, p in enumerate(params) for token, value in (p.logit_bias or {}).items()]
    logit_bias = None
    if bias:
        rows, tokens, values = zip(*bias)
        logit_bias = (column(rows, torch.int64), column(tokens, torch.int64), column(values))
    wanted_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    all_greedy = all(p.greedy for p in params)
    return SamplingBatch(
        temperature=None if all_greedy else column([p.temperature for p in params]),
        all_greedy=all_greedy,
        top_k=optional("top_k", 0, torch.int64, replace_off=2**31 - 1),
        top_p=optional("top_p", 1.0),
        min_p=optional("min_p", 0.0),
        presence_penalty=column([p.presence_penalty for p in params]) if penalties else None,
        frequency_penalty=column([p.frequency_penalty for p in params]) if penalties else None,
        repetition_penalty=column([p.repetition_penalty for p in params]) if penalties else None,
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in states] if penalties else [],
        output_token_ids=[s.output_token_ids for s in states] if penalties else [],
        seeds=seeds,
        masked_token_ids=masked,
        max_num_logprobs=max(wanted_logprobs) if wanted_logprobs else None,
        logit_bias=logit_bias,
    )
