"""Tool-call and reasoning parsers, and the chat output views streams are diffed from
(pure string work, no model)."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.chat_output import ChatOutputParser, StreamDiffer
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import FunctionDefinition
from pagedllm.entrypoints.openai.reasoning import REASONING_PARSERS
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedllm.entrypoints.openai.tools import ToolOptions, ToolPlan, plan_tools

ARGS = {"city": "Paris", "days": 2}


@pytest.mark.parametrize(
    "parser, text, content",
    [
        ("hermes", f'Let me check.<tool_call>\n{{"name": "weather", "arguments": {json.dumps(ARGS)}}}\n</tool_call>', "Let me check."),
        ("hermes", f'<tool_call>{{"name": "weather", "arguments": {json.dumps(ARGS)}}}</tool_call>\n<tool_call>{{"name": "time", "arguments": {{}}}}</tool_call>', ""),
        ("llama3_json", f'{{"name": "weather", "parameters": {json.dumps(ARGS)}}}; {{"name": "time", "parameters": {{}}}}', ""),
        ("llama3_json", f'<|python_tag|>{{"name": "weather", "parameters": {json.dumps(ARGS)}}}', ""),
        ("mistral", f'[TOOL_CALLS] [{{"name": "weather", "arguments": {json.dumps(ARGS)}}}]', ""),
        ("mistral", f"[TOOL_CALLS]weather[ARGS]{json.dumps(ARGS)}", ""),
        ("pythonic", '[weather(city="Paris", days=2), time()]', ""),
    ],
)
def test_tool_parsers_read_calls(parser, text, content):
    view = ChatOutputParser(ToolPlan("auto", parser=TOOL_PARSERS[parser]())).view(text, final=True)
    assert view.content == content
    assert view.calls[0] == ("weather", json.dumps(ARGS))
    assert all(isinstance(json.loads(arguments), dict) for _, arguments in view.calls)


def test_auto_streams_content_and_holds_a_half_written_marker():
    parser = ChatOutputParser(ToolPlan("auto", parser=TOOL_PARSERS["hermes"]()))
    assert parser.view("Hello <tool_", final=False).content == "Hello "
    assert parser.view("Hello <tool_", final=True).content == "Hello <tool_"
    assert parser.view('Hi <tool_call>{"name": "f", "argu', final=False).content == "Hi "
    broken = parser.view("<tool_call>not json", final=True)
    assert broken.content == "<tool_call>not json" and broken.calls == []


def test_stream_differ_sends_each_part_once():
    parser = ChatOutputParser(ToolPlan("named", named="weather"))
    differ, sent = StreamDiffer(), ""
    for end in range(0, 20, 3):
        parts = differ.delta(parser.view(json.dumps(ARGS)[:end], final=False))
        sent += "".join(args for _, _, _, args in parts.new_calls) + "".join(args for _, args in parts.arguments)
    sent += "".join(a for _, a in differ.delta(parser.view(json.dumps(ARGS), final=True)).arguments)
    assert sent == json.dumps(ARGS) and len(differ.calls) == 1


def test_required_emits_complete_calls_only():
    parser = ChatOutputParser(ToolPlan("required"))
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y"'
    assert parser.view(text, final=False).calls == [("a", '{"x": 1}')]


@pytest.mark.parametrize(
    "name, text, final, expected",
    [
        ("qwen3", "<think>hmm</think>Paris.", True, ("hmm", "Paris.")),
        ("qwen3", "Paris.", True, ("", "Paris.")),
        ("qwen3", "<think>still thinking</th", False, ("still thinking", "")),
        ("qwen3", "<thi", False, ("", "")),
        ("deepseek_r1", "thinking</think>Paris.", True, ("thinking", "Paris.")),
        ("deepseek_r1", "only thinking", True, ("only thinking", "")),
    ],
)
def test_reasoning_parsers(name, text, final, expected):
    assert REASONING_PARSERS[name].split(text, final) == expected


def test_tool_plans():
    tools = [FunctionDefinition(name="f", parameters={"type": "object", "properties": {"x": {"type": "integer"}}})]
    with pytest.raises(BadRequestError, match="--enable-auto-tool-choice"):
        plan_tools(tools, "auto", None, None, ToolOptions())
    assert plan_tools(tools, "none", None, None, ToolOptions()).template_tools is None
    named = plan_tools(tools, None, "f", None, ToolOptions())
    assert named.mode == "named" and json.loads(named.constraint.key[1])["properties"]["x"] == {"type": "integer"}
    single = json.loads(plan_tools(tools, "required", None, False, ToolOptions()).constraint.key[1])
    assert single["maxItems"] == 1 and single["minItems"] == 1


TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} city={{ c.function.arguments.city }}]{% endfor %}|{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
)


def test_render_chat_passes_tools_kwargs_and_parsed_arguments(tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer

    from pagedllm.entrypoints.openai.serving_chat import render_chat

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = TEMPLATE
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    text = tokenizer.decode(render_chat(tokenizer, messages, False, {"enable_thinking": False}, tools))
    assert text == "TOOLS:weather;|user: Weather?|assistant: [call weather city=Paris]|tool: 21 C|/no_think"


from model_utils import tokenizer_dir  # noqa: E402,F401  (fixture)
