"""The agent-facing API on a real server with the official openai client: structured
outputs (every mode, validated with jsonschema), tool calling (required, named, auto with
the hermes parser), reasoning (qwen3 parser), their streams, and their errors. The bundled
model cannot choose to call a tool, so "auto" and reasoning are driven by a regex
constraint that makes it write the format."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    server = RemoteServer([*DEFAULT_ARGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=600)


def _streamed_chat(client, **kwargs):
    """(content, reasoning, tool calls as (name, arguments), finish reason) reassembled from a stream."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or call.id
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())
    return content, reasoning, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish


# -- structured outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kwargs = dict(messages=ASK, max_tokens=60, temperature=0.7, seed=1, response_format=fmt)
    if stream:
        text, _, _, finish = _streamed_chat(client, **kwargs)
    else:
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    jsonschema.validate(json.loads(text), PERSON)
    assert finish == "stop"


def test_json_object_on_completions_and_n(client):
    result = client.completions.create(
        model=MODEL, prompt="A JSON object describing a cat:", max_tokens=80, n=2, temperature=0.8, seed=2,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM accepts it on completions too
    )
    for choice in result.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
    assert any(c.finish_reason == "stop" for c in result.choices)


@pytest.mark.parametrize(
    "body, check",
    [
        ({"structured_outputs": {"regex": r"\d{3}-\d{4}"}}, lambda t: len(t) == 8 and t[3] == "-" and t.replace("-", "").isdigit()),
        ({"guided_regex": r"(yes|no), because [a-z]{1,12}[.]"}, lambda t: t.split(",")[0] in ("yes", "no") and t.endswith(".")),
        ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
        ({"guided_choice": ["Paris", "London"]}, lambda t: t in ("Paris", "London")),
        ({"structured_outputs": {"grammar": 'root ::= "The answer is " ("A" | "B") "."'}}, lambda t: t in ("The answer is A.", "The answer is B.")),
        ({"guided_grammar": 'root ::= [1-9] [0-9]? " apples"'}, lambda t: t.endswith(" apples") and t[:-7].isdigit()),
        ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"guided_json": json.dumps(TIME)}, lambda t: jsonschema.validate(json.loads(t), TIME) is None),
    ],
)
def test_structured_output_modes(client, body, check):
    result = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=60, temperature=0, extra_body=body)
    text = result.choices[0].text
    assert result.choices[0].finish_reason == "stop", text
    assert check(text), text


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format", "nonsense"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"structured_outputs": {"regex": "a[b"}}, "structured_outputs", "Unclosed"),
        ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar", "EBNF"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice", "launch_rocket"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "cannot be combined"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}, "tools", "nonsense"),
    ],
)
def test_bad_constraints_are_400_and_the_server_carries_on(server, client, body, param, words):
    response = httpx.post(server.url("/v1/chat/completions"), json={"model": MODEL, "messages": ASK, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices[0].message.content is not None


# -- tools ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice(client, stream):
    kwargs = dict(messages=WEATHER_ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0)
    if stream:
        content, _, calls, finish = _streamed_chat(client, **kwargs)
        assert content == ""
    else:
        message = (reply := client.chat.completions.create(model=MODEL, **kwargs)).choices[0].message
        calls, finish = [(c.function.name, c.function.arguments) for c in message.tool_calls], reply.choices[0].finish_reason
        assert message.content is None and message.tool_calls[0].id.startswith("call_")
    assert finish == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_calls_parse_and_match(client, stream):
    kwargs = dict(messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0.8, seed=5)
    if stream:
        _, _, calls, finish = _streamed_chat(client, **kwargs)
    else:
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
        finish = reply.choices[0].finish_reason
    assert finish == "tool_calls" and calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_without_parallel_calls_makes_one(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0
    )
    assert len(reply.choices[0].message.tool_calls) == 1


HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_with_the_hermes_parser(client, stream):
    kwargs = dict(messages=WEATHER_ASK, tools=TOOLS, max_tokens=120, temperature=0, extra_body={"structured_outputs": {"regex": r"Sure\. " + HERMES_CALL}})
    if stream:
        content, _, calls, finish = _streamed_chat(client, **kwargs)
    else:
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        content, calls = message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert content == "Sure. " and finish == "tool_calls"
    assert calls == [("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))]


def test_auto_without_a_call_is_plain_content(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_tool_call_and_result_round_trip(client):
    first = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *WEATHER_ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=10, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


# -- reasoning --------------------------------------------------------------------------------------


def test_reasoning_parser_splits_think_in_messages_and_streams(client):
    body = {"structured_outputs": {"regex": "<think>[a-z ]{5,30}</think>The answer is [A-Z][a-z]+[.]"}}
    kwargs = dict(messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=60, temperature=0, extra_body=body)
    message = client.chat.completions.create(model=MODEL, **kwargs).choices[0].message
    assert message.reasoning_content and "<think>" not in message.reasoning_content
    assert message.content.startswith("The answer is ") and "think>" not in message.content
    assert message.model_extra["reasoning"] == message.reasoning_content
    content, reasoning, _, _ = _streamed_chat(client, **kwargs)
    assert (content, reasoning) == (message.content, message.reasoning_content)


# -- /v1/responses ----------------------------------------------------------------------------------


def test_responses_text_instructions_and_continuation(client):
    first = client.responses.create(model=MODEL, input="What is the capital of France?", instructions="Answer in one word.", max_output_tokens=8, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.input_tokens > 0 and 1 <= first.usage.output_tokens <= 8
    assert client.responses.retrieve(first.id).output_text == first.output_text
    follow = client.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "And of Italy?"}]}],
                                     previous_response_id=first.id, max_output_tokens=8, temperature=0)
    assert follow.output_text and follow.usage.input_tokens > first.usage.input_tokens + 5
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_unknown")


def test_responses_stream_events(client):
    full = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=10, temperature=0)
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=10, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full.output_text
    assert events[-1].response.output_text == full.output_text


def test_responses_json_schema_and_function_tools(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    result = client.responses.create(model=MODEL, input="Describe a person as JSON.", text=fmt, max_output_tokens=60, temperature=0)
    jsonschema.validate(json.loads(result.output_text), PERSON)
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=tools, tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0)
    call = [item for item in client.responses.create(**kwargs).output if item.type == "function_call"][0]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    events = list(client.responses.create(**kwargs, stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    answer = client.responses.create(
        model=MODEL, max_output_tokens=8, temperature=0, tools=tools,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tool_choice="none",
    )
    assert answer.output_text
