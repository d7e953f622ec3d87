"""Engine logprobs (one {token id: Logprob} dict per position) in OpenAI's two formats:
completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat
(`content: [{token, logprob, bytes, top_logprobs}]`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pagedllm.entrypoints.openai.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from pagedllm.outputs import Logprob

Decode = Callable[[int], str]


def _token_text(token_id: int, logprob: Logprob | None, decode: Decode) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return decode(token_id)


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(position.items(), key=lambda item: -item[1].logprob)[:k]


def append_completion_logprobs(
    out: CompletionLogprobs,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Logprob] | None],
    num_top: int,
    decode: Decode,
    text_offset: int,
) -> int:
    """Append positions to `out`; returns the text offset after them. A None position (the
    first prompt token when echoing) has no logprob."""
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id) if position is not None else None
        text = _token_text(token_id, chosen, decode)
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        if position is None:
            out.top_logprobs.append(None)
        else:
            top = {_token_text(t, lp, decode): lp.logprob for t, lp in _top(position, num_top)}
            if chosen is not None:
                top.setdefault(text, chosen.logprob)
            out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return text_offset


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]], num_top: int, decode: Decode
) -> ChatLogprobs:
    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id)
        text = _token_text(token_id, chosen, decode)
        top = [
            TopLogprob(token=(t_text := _token_text(t, lp, decode)), logprob=lp.logprob, bytes=list(t_text.encode()))
            for t, lp in _top(position, num_top)
        ]
        content.append(
            TokenLogprob(
                token=text,
                logprob=chosen.logprob if chosen is not None else float("-inf"),
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
