"""Pydantic models of OpenAI's Responses API (POST /v1/responses) as this server speaks it.
Output items and stream events are built as plain dicts in serving_responses.py: their
shapes are many and flat, and the openai client validates them on its side."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pagedllm.entrypoints.openai.protocol import FunctionDefinition, _Request


class ResponsesTool(_Request):
    type: str  # only "function" runs here; others are refused by name
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def function_tools(self) -> list[FunctionDefinition] | None:
        if not self.tools:
            return None
        return [FunctionDefinition(name=t.name or "", description=t.description, parameters=t.parameters, strict=t.strict) for t in self.tools]
