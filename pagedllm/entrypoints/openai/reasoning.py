"""Reasoning parsers (`--reasoning-parser`): the model's `<think>...</think>` moved out of
the content into `reasoning_content`.

A parser splits the text generated so far into (reasoning, content). While the text is
still growing, a tag that may be half written at its end is held back, so each split
extends the previous one and a stream can send the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    # Without "</think>": is the text reasoning (deepseek_r1: its template opens the block in
    # the prompt) or content unless it opened with "<think>" (qwen3, also with thinking off)?
    reasoning_without_end: bool

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if not final and _partial_prefix(text.lstrip(), START):
            return "", ""  # "<thi": wait and see
        body = text.lstrip()
        opened = body.startswith(START)
        if opened:
            body = body[len(START) :]
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END) :]
        if not (opened or self.reasoning_without_end):
            return "", text
        return (body if final else body[: len(body) - held(body, END)]), ""


def _partial_prefix(text: str, tag: str) -> bool:
    """`text` is a non-empty proper prefix of `tag`."""
    return 0 < len(text) < len(tag) and tag.startswith(text)


def held(text: str, tag: str) -> int:
    """(Also used by the tool parsers.) Length of the longest end of `text` that could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


REASONING_PARSERS = {
    "qwen3": ReasoningParser("qwen3", reasoning_without_end=False),
    "deepseek_r1": ReasoningParser("deepseek_r1", reasoning_without_end=True),
}
