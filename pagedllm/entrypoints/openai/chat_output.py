"""What a chat choice's generated text means: reasoning, content and tool calls, for a
whole reply or as stream deltas (shared by chat completions and the Responses API).

`view(text, final)` splits the text generated so far. Until `final`, each view extends
the previous one (parts that may still change are held back), so `StreamDiffer` can send
the difference: new reasoning, new content, a new call (id and name first) or the new
end of a call's arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.reasoning import ReasoningParser
from pagedllm.entrypoints.openai.tool_parsers import ParsedCall
from pagedllm.entrypoints.openai.tools import ToolPlan


@dataclass
class OutputView:
    reasoning: str
    content: str
    calls: list[ParsedCall]  # (name, arguments so far)


@dataclass
class ChatOutputParser:
    plan: ToolPlan
    reasoning_parser: ReasoningParser | None = None

    def view(self, text: str, final: bool) -> OutputView:
        reasoning, rest = self.reasoning_parser.split(text, final) if self.reasoning_parser else ("", text)
        mode = self.plan.mode
        if mode == "named":
            return OutputView(reasoning, "", [(self.plan.named, rest)])
        if mode == "required":
            return OutputView(reasoning, "", _complete_items(rest))
        parser = self.plan.parser
        if mode != "auto" or parser is None:
            return OutputView(reasoning, rest, [])
        start = parser.start(rest)
        if start is None:
            return OutputView(reasoning, rest if final else rest[: len(rest) - parser.hold(rest)], [])
        if not final:
            return OutputView(reasoning, rest[:start], [])
        try:
            calls = parser.parse(rest[start:])
        except (ValueError, KeyError, TypeError):
            return OutputView(reasoning, rest, [])  # not a valid call after all: it is content
        return OutputView(reasoning, rest[:start] if calls else rest, calls)


def _complete_items(text: str) -> list[ParsedCall]:
    """The complete {"name", "parameters"} objects of a JSON array still being written."""
    decoder, calls = json.JSONDecoder(), []
    i = text.find("[")
    if i < 0:
        return calls
    i += 1
    while True:
        while i < len(text) and text[i] in " \n\t\r,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return calls
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return calls
        calls.append((item["name"], json.dumps(item["parameters"])))


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class DeltaParts:
    reasoning: str = ""
    content: str = ""
    new_calls: list[tuple[int, str, str, str]] = field(default_factory=list)  # (index, id, name, arguments)
    arguments: list[tuple[int, str]] = field(default_factory=list)  # (index, more arguments)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.new_calls or self.arguments)


@dataclass
class StreamDiffer:
    """What of a choice's views has been sent."""

    reasoning: int = 0
    content: int = 0
    calls: list[tuple[str, int]] = field(default_factory=list)  # (id, argument characters sent)

    def delta(self, view: OutputView) -> DeltaParts:
        parts = DeltaParts(view.reasoning[self.reasoning :], view.content[self.content :])
        self.reasoning = max(self.reasoning, len(view.reasoning))
        self.content = max(self.content, len(view.content))
        for index, (name, arguments) in enumerate(view.calls):
            if index >= len(self.calls):
                call_id = tool_call_id()
                self.calls.append((call_id, len(arguments)))
                parts.new_calls.append((index, call_id, name, arguments))
            else:
                call_id, sent = self.calls[index]
                if len(arguments) > sent:
                    parts.arguments.append((index, arguments[sent:]))
                    self.calls[index] = (call_id, len(arguments))
        return parts
