"""Sampling on the device for a whole batch at once.

Order (as vLLM): the runner applies grammar bitmasks first (apply_token_bitmask); then
logprobs of the model output are taken; stop tokens are masked for requests short of
min_tokens, logit_bias added, penalties applied, and the
token is picked: argmax for temperature 0, otherwise temperature -> top-k ->
top-p -> min-p -> an exponential race (argmax of p / q with q ~ Exp(1), which
draws from p). Seeded requests draw their q from a generator seeded per request and
position, so their samples do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class DeviceTokenLogprobs:
    """Logprobs at some positions, on the device: the chosen token first, then the top-k
    alternatives (core.interface.TokenLogprobs is the host copy)."""

    token_ids: torch.Tensor  # [N, 1 + k] int64
    logprobs: torch.Tensor  # [N, 1 + k] float32
    ranks: torch.Tensor  # [N] int64, rank of the chosen token (1 = most likely)


@dataclass
class SamplingBatch:
    """Per-row sampling settings of the rows that sample this step."""

    temperature: torch.Tensor | None  # [B] float32, 0 = greedy; None when all rows are greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32 (all three set together)
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    prompt_token_ids: list[list[int]]  # for the repetition penalty
    output_token_ids: list[list[int]]  # for all penalties
    seeds: dict[int, int]  # row -> seed of this step's draw (seeded requests)
    masked_token_ids: dict[int, list[int]]  # row -> stop tokens masked (min_tokens not reached)
    max_num_logprobs: int | None  # None = no logprobs this step
    # logit_bias of every row that has one, flattened: (rows, token ids, values), on the device
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: DeviceTokenLogprobs | None


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> DeviceTokenLogprobs:
    """The chosen tokens' logprobs and ranks, plus the top-k alternatives. logprobs: [N, V]."""
    chosen = logprobs.gather(1, token_ids[:, None])  # (N, 1)
    ranks = (logprobs > chosen).sum(-1) + 1
    if k > 0:
        top = logprobs.topk(k, dim=-1)
        ids = torch.cat([token_ids[:, None], top.indices], dim=1)
        values = torch.cat([chosen, top.values], dim=1)
    else:
        ids, values = token_ids[:, None], chosen
    return DeviceTokenLogprobs(ids, values.float(), ranks)


class Sampler:
    def __init__(self, device: str) -> None:
        self.generator = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()  # (B, V)
        logprobs = None
        if batch.max_num_logprobs is not None:
            raw = logits.log_softmax(dim=-1)
        for row, token_ids in batch.masked_token_ids.items():
            logits[row, token_ids] = float("-inf")
        if batch.logit_bias is not None:
            logits.index_put_(batch.logit_bias[:2], batch.logit_bias[2], accumulate=True)
        if batch.presence_penalty is not None:
            logits = apply_penalties(logits, batch)
        sampled = logits.argmax(dim=-1)
        if not batch.all_greedy:
            sampled = torch.where(batch.temperature == 0, sampled, self._random(logits, batch))
        if batch.max_num_logprobs is not None:
            logprobs = token_logprobs(raw, sampled, batch.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)

    def _random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        if batch.min_p is not None:
            threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = torch.empty_like(probs).exponential_()
        for row, seed in batch.seeds.items():
            q[row].exponential_(generator=self.generator.manual_seed(seed))
        return (probs / q).argmax(dim=-1)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Grammar masks, in place: token t of row r stays allowed iff bit t % 32 of
    bitmask[r, t // 32] is set (xgrammar's layout); the others get -inf. bitmask: int32
    [B, ceil(V / 32)] on the logits' device; no host sync."""
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, device=logits.device, dtype=torch.int32)
    V = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :V].bool()  # (B, V)
    if allowed.shape[1] < V:  # a vocabulary padded past the mask: padding tokens never allowed
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]))
    logits.masked_fill_(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    B, V = logits.shape
    counts = _token_counts(batch.output_token_ids, B, V, logits.device)
    in_prompt = _token_counts(batch.prompt_token_ids, B, V, logits.device) > 0
    seen = in_prompt | (counts > 0)
    rep = batch.repetition_penalty[:, None]
    # Repetition penalty (multiplicative, on prompt and output tokens), as HF/vLLM.
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    # Frequency and presence penalties (additive, on output tokens), as OpenAI.
    logits = logits - batch.frequency_penalty[:, None] * counts
    return logits - batch.presence_penalty[:, None] * (counts > 0)


def _token_counts(token_lists: list[list[int]], B: int, V: int, device) -> torch.Tensor:
    counts = torch.zeros(B, V + 1, device=device)  # column V absorbs padding
    width = max((len(t) for t in token_lists), default=0)
    if width:
        padded = torch.full((B, width), V, dtype=torch.int64)
        for row, tokens in enumerate(token_lists):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        counts.scatter_add_(1, padded.to(device), torch.ones(B, width, device=device))
    return counts[:, :V]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending
    V = logits.shape[-1]
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (V - top_k.clamp(1, V))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1 - top_p[:, None])
        outside[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
