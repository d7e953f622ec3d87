"""Tools in a chat request: what reaches the chat template, and how tool_choice is kept.

    none      tools are not shown to the model; plain content
    auto      tools reach the template; the --tool-call-parser finds calls in the output
              (needs --enable-auto-tool-choice, as in vLLM)
    required  the output is constrained (structured outputs) to a JSON array of one or more
              {"name": <a tool>, "parameters": <its schema>}: calls always parse and match
    named     the output is constrained to the named tool's parameter schema
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import FunctionDefinition
from pagedllm.entrypoints.openai.structured import make_structured_outputs
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolParser
from pagedllm.sampling_params import StructuredOutputsParams

ToolMode = Literal["none", "auto", "required", "named"]
_ANY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolOptions:
    """The server's tool-calling options (`--tool-call-parser`, `--enable-auto-tool-choice`)."""

    parser: str | None = None
    enable_auto_tool_choice: bool = False

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {self.parser!r}: choose one of {', '.join(TOOL_PARSERS)}")


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    template_tools: list[dict[str, Any]] | None = None  # for apply_chat_template(tools=...)
    constraint: StructuredOutputsParams | None = None
    named: str | None = None
    parser: ToolParser | None = None


def plan_tools(
    tools: list[FunctionDefinition] | None,
    tool_choice: str | None,
    named: str | None,
    parallel_tool_calls: bool | None,
    options: ToolOptions,
    param: str = "tool_choice",
) -> ToolPlan:
    """tool_choice is "none" / "auto" / "required" or None with `named` set for a named choice."""
    if not tools:
        if named is not None or tool_choice == "required":
            raise BadRequestError("tool_choice needs tools: give the functions in tools", param=param)
        return ToolPlan("none")
    mode: ToolMode = "named" if named is not None else (tool_choice or "auto")  # type: ignore[assignment]
    if mode == "none":
        return ToolPlan("none")
    template_tools = [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in tools]
    by_name = {t.name: t for t in tools}
    if mode == "auto":
        if not options.enable_auto_tool_choice or options.parser is None:
            raise BadRequestError(
                'tool_choice "auto" needs the server started with --enable-auto-tool-choice and --tool-call-parser '
                '(hermes, llama3_json, mistral or pythonic); or send tool_choice "required" or a named function',
                param=param,
            )
        return ToolPlan("auto", template_tools, parser=TOOL_PARSERS[options.parser]())
    if mode == "named":
        if named not in by_name:
            raise BadRequestError(f"tool_choice names {named!r}, which is not in tools ({', '.join(by_name)})", param=param)
        schema = by_name[named].parameters or _ANY_OBJECT
        return ToolPlan("named", template_tools, make_structured_outputs({"json": schema}, "tools"), named=named)
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": t.parameters or _ANY_OBJECT},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return ToolPlan("required", template_tools, make_structured_outputs({"json": schema}, "tools"))


def template_messages_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool_calls with arguments as objects, as chat templates expect
    (the API carries them as JSON text)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        call = dict(call)
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass  # leave it as text: the template shows what the client sent
        call["function"] = function
        fixed.append(call)
    return {**message, "tool_calls": fixed}
