"""Tool-call parsers for tool_choice "auto" (`--tool-call-parser`, vLLM's names): find
where a model's tool calls start in its output and read them.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen2.5, Qwen3, Hermes)
    llama3_json  {"name": ..., "parameters": {...}} at the start, several joined by ";" (Llama 3.x)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
    pythonic     [get_weather(city="Paris"), ...] (Llama 3.2 / 4 pythonic templates)

`start(text)` is where the calls begin (None: not yet), `hold(text)` how much of the end
of the text may still turn into a start (not streamed as content yet), and `parse(section)`
the calls as (name, arguments as JSON text); ValueError if the section is not valid.
"""

from __future__ import annotations

import ast
import json
import re

from pagedllm.entrypoints.openai.reasoning import held

ParsedCall = tuple[str, str]  # (name, arguments as JSON text)


class ToolParser:
    marker = ""

    def start(self, text: str) -> int | None:
        index = text.find(self.marker)
        return None if index < 0 else index

    def hold(self, text: str) -> int:
        return held(text, self.marker)

    def parse(self, section: str) -> list[ParsedCall]:
        raise NotImplementedError


class LeadingToolParser(ToolParser):
    """Calls only at the very start of the output (after whitespace)."""

    opening = ""

    def start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith(self.opening) else None

    def hold(self, text: str) -> int:
        return len(text) if not text.strip() else 0  # only leading whitespace so far


class HermesToolParser(ToolParser):
    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, section: str) -> list[ParsedCall]:
        return [_call_from_json(json.loads(body)) for body in self._CALL.findall(section) if body.strip()]


class Llama3JsonToolParser(LeadingToolParser):
    opening = ""
    _TAG = "<|python_tag|>"

    def start(self, text: str) -> int | None:
        body = text.lstrip()
        if body.startswith(self._TAG) or body.startswith("{"):
            return len(text) - len(body)
        return None

    def parse(self, section: str) -> list[ParsedCall]:
        section = section.strip().removeprefix(self._TAG).strip()
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(section):
            value, i = decoder.raw_decode(section, i)
            calls.append(_call_from_json(value))
            while i < len(section) and section[i] in " \n\t;":
                i += 1
        return calls


class MistralToolParser(ToolParser):
    marker = "[TOOL_CALLS]"

    def parse(self, section: str) -> list[ParsedCall]:
        body = section[len(self.marker) :].strip()
        if body.startswith("["):
            return [_call_from_json(item) for item in json.loads(body)]
        calls = []  # the newer form: name[ARGS]{...}, repeated after further [TOOL_CALLS]
        for part in body.split(self.marker):
            name, _, arguments = part.partition("[ARGS]")
            calls.append((name.strip(), json.dumps(json.loads(arguments))))
        return calls


class PythonicToolParser(LeadingToolParser):
    opening = "["

    def parse(self, section: str) -> list[ParsedCall]:
        try:
            tree = ast.parse(section.strip(), mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"not a list of calls: {e}") from e
        if not isinstance(tree, ast.List) or not all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) for c in tree.elts):
            raise ValueError("not a list of function calls")
        return [
            (call.func.id, json.dumps({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}))
            for call in tree.elts
        ]


def _call_from_json(value) -> ParsedCall:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError("a tool call must be an object with a name")
    arguments = value.get("arguments", value.get("parameters", {}))
    return value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}
