"""POST /v1/responses (OpenAI's Responses API) on the chat machinery: the input (text or
items) becomes chat messages, the reply becomes output items (reasoning, message,
function calls), streamed as typed events.

    response.created, response.in_progress
      per item: response.output_item.added
                response.reasoning_text.delta* | response.content_part.added,
                response.output_text.delta*, response.output_text.done, response.content_part.done |
                response.function_call_arguments.delta*, response.function_call_arguments.done
                response.output_item.done
    response.completed

Stored responses (store, the default) live in a bounded in-memory LRU, so that
previous_response_id continues a conversation and GET /v1/responses/{id} finds it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_client import AsyncEngineClient, RequestStream
from pagedllm.entrypoints.openai.chat_output import ChatOutputParser, OutputView, StreamDiffer, tool_call_id
from pagedllm.entrypoints.openai.errors import BadRequestError, NotFoundError
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagedllm.entrypoints.openai.serving_chat import ChatOptions, render_chat
from pagedllm.entrypoints.openai.serving_common import add_requests, check_model, error_body, final_outputs, random_id
from pagedllm.entrypoints.openai.sse import SSEResponse, cancel_on_disconnect
from pagedllm.entrypoints.openai.structured import make_structured_outputs
from pagedllm.entrypoints.openai.tools import ToolPlan, plan_tools
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

MAX_STORED_RESPONSES = 1000

Message = dict[str, Any]


@dataclass
class _Stored:
    messages: list[Message]  # the conversation, this response's output included (no instructions)
    body: dict[str, Any]


class ResponseStore:
    """The last MAX_STORED_RESPONSES stored responses, least recently used out first."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, _Stored] = OrderedDict()

    def put(self, response_id: str, stored: _Stored) -> None:
        self._items[response_id] = stored
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> _Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored


@dataclass
class _Turn:
    """One request, ready to run."""

    request: ResponsesRequest
    response_id: str
    messages: list[Message]  # without the instructions
    plan: ToolPlan
    params: SamplingParams
    created_at: int = field(default_factory=lambda: int(time.time()))


class ResponsesHandler:
    def __init__(self, client: AsyncEngineClient, served_name: str, options: ChatOptions = ChatOptions()) -> None:
        self.client = client
        self.served_name = served_name
        self.options = options
        self.store = ResponseStore()

    def retrieve(self, response_id: str) -> Response:
        stored = self.store.get(response_id)
        if stored is None:
            raise NotFoundError(f"no stored response {response_id!r} (this server keeps the last {MAX_STORED_RESPONSES} in memory)")
        return JSONResponse(stored.body)

    async def create(self, request: ResponsesRequest, raw_request: Request) -> Response:
        check_model(request.model, self.served_name)
        turn = self._turn(request)
        system = [{"role": "system", "content": request.instructions}] if request.instructions else []
        prompt_ids = render_chat(self.client.tokenizer, system + turn.messages, True, None, turn.plan.template_tools)
        (stream,) = add_requests(self.client, turn.response_id, [prompt_ids], turn.params, param="input")
        parser = ChatOutputParser(turn.plan, self.options.reasoning)
        if request.stream:
            return SSEResponse(self._stream(turn, stream, parser), on_close=stream.abort)
        try:
            (output,) = await cancel_on_disconnect(raw_request, final_outputs([stream]))
        except Exception as e:
            raise error_body(e) from e
        finally:
            stream.abort()
        completion = output.outputs[0]
        view = parser.view(completion.text, final=True)
        items = _reasoning_items(view) + _message_items(view) + [_call_item(tool_call_id(), n, a) for n, a in view.calls]
        body = self._finish(turn, items, output)
        return JSONResponse(body)

    # -- the request ---------------------------------------------------------------------------

    def _turn(self, request: ResponsesRequest) -> _Turn:
        bad = [t.type for t in request.tools or [] if t.type != "function"]
        if bad:
            raise BadRequestError(f"tools of type {bad[0]!r} are not supported: only function tools", param="tools")
        history: list[Message] = []
        if request.previous_response_id is not None:
            stored = self.store.get(request.previous_response_id)
            if stored is None:
                raise BadRequestError(
                    f"previous_response_id {request.previous_response_id!r} is not stored here: this server keeps the last "
                    f"{MAX_STORED_RESPONSES} responses made with store=true, in memory; send the whole conversation as input",
                    param="previous_response_id",
                )
            history = list(stored.messages)
        messages = history + input_messages(request.input)
        choice = request.tool_choice
        named = choice.name if choice is not None and not isinstance(choice, str) else None
        plan = plan_tools(request.function_tools(), choice if isinstance(choice, str) else None, named, request.parallel_tool_calls, self.options.tools)
        constraint = plan.constraint
        fmt = request.text.format if request.text is not None else None
        if fmt is not None and fmt.type != "text":
            if constraint is not None:
                raise BadRequestError("text.format cannot be combined with a required or named tool_choice", param="text")
            if fmt.type == "json_schema" and fmt.json_schema is None:
                raise BadRequestError("text.format of type json_schema needs a schema", param="text")
            constraint = make_structured_outputs({"json": fmt.json_schema} if fmt.type == "json_schema" else {"json_object": True}, "text")
        try:
            params = SamplingParams(
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                seed=request.seed,
                max_tokens=request.max_output_tokens,
                structured_outputs=constraint,
            )
        except ValueError as e:
            raise BadRequestError(str(e), param=str(e).split(" ", 1)[0]) from e
        return _Turn(request, random_id("resp"), messages, plan, params)

    def _finish(self, turn: _Turn, items: list[dict[str, Any]], output: RequestOutput) -> dict[str, Any]:
        completion = output.outputs[0]
        body = self._body(turn, items, "incomplete" if completion.finish_reason == "length" else "completed")
        body["usage"] = {
            "input_tokens": len(output.prompt_token_ids),
            "input_tokens_details": {"cached_tokens": output.num_cached_tokens},
            "output_tokens": len(completion.token_ids),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(output.prompt_token_ids) + len(completion.token_ids),
        }
        if turn.request.store:
            self.store.put(turn.response_id, _Stored(turn.messages + output_messages(items), body))
        return body

    def _body(self, turn: _Turn, items: list[dict[str, Any]], status: str) -> dict[str, Any]:
        request = turn.request
        return {
            "id": turn.response_id,
            "object": "response",
            "created_at": turn.created_at,
            "status": status,
            "model": self.served_name,
            "output": items,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "temperature": turn.params.temperature,
            "top_p": turn.params.top_p,
            "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in request.tools or []],
            "tool_choice": request.tool_choice if isinstance(request.tool_choice, str) or request.tool_choice is None else request.tool_choice.model_dump(),
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "text": request.text.model_dump(by_alias=True, exclude_none=True) if request.text else {"format": {"type": "text"}},
            "previous_response_id": request.previous_response_id,
            "store": request.store,
            "metadata": request.metadata or {},
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": None,
        }

    # -- streaming -----------------------------------------------------------------------------

    async def _stream(self, turn: _Turn, stream: RequestStream, parser: ChatOutputParser) -> AsyncIterator[str]:
        events = _EventWriter()
        yield events.send("response.created", response=self._body(turn, [], "in_progress"))
        yield events.send("response.in_progress", response=self._body(turn, [], "in_progress"))
        differ, items = StreamDiffer(), _OpenItems(events)
        output = None
        try:
            async for output in stream:
                completion = output.outputs[0]
                final = completion.finish_reason is not None
                parts = differ.delta(parser.view(completion.text if final else stream.text_to_send(0), final))
                for chunk in items.feed(parts):
                    yield chunk
            for chunk in items.close_all():
                yield chunk
            assert output is not None
            yield events.send("response.completed", response=self._finish(turn, items.done, output))
        except Exception as e:
            error = error_body(e)
            yield events.send("error", code=error.code, message=error.message, param=error.param)


class _EventWriter:
    def __init__(self) -> None:
        self.sequence_number = 0

    def send(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


class _OpenItems:
    """The output items of a stream: opened as their first delta comes, closed in order."""

    def __init__(self, events: _EventWriter) -> None:
        self.events = events
        self.done: list[dict[str, Any]] = []
        self.open: dict[str, tuple[int, dict[str, Any]]] = {}  # kind or call index -> (output index, item)
        self.count = 0

    def _add(self, key: str, item: dict[str, Any]) -> list[str]:
        chunks = [self.events.send("response.output_item.added", output_index=self.count, item=item)]
        self.open[key] = (self.count, item)
        self.count += 1
        if item["type"] == "message":
            chunks.append(self._part_event("response.content_part.added", "", self.count - 1, item))
        return chunks

    def _part_event(self, kind: str, text: str, index: int, item: dict[str, Any]) -> str:
        part = {"type": "output_text", "text": text, "annotations": []}
        return self.events.send(kind, item_id=item["id"], output_index=index, content_index=0, part=part)

    def feed(self, parts) -> list[str]:
        chunks: list[str] = []
        send = self.events.send
        if parts.reasoning:
            if "reasoning" not in self.open:
                chunks += self._add("reasoning", {"type": "reasoning", "id": random_id("rs"), "summary": [], "content": [], "status": "in_progress"})
            index, item = self.open["reasoning"]
            item.setdefault("_text", "")
            item["_text"] += parts.reasoning
            chunks.append(send("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0, delta=parts.reasoning))
        if parts.content:
            chunks += self._close("reasoning")
            if "message" not in self.open:
                item = {"type": "message", "id": random_id("msg"), "status": "in_progress", "role": "assistant", "content": []}
                chunks += self._add("message", item)
            index, item = self.open["message"]
            item["_text"] = item.get("_text", "") + parts.content
            chunks.append(send("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0, delta=parts.content, logprobs=[]))
        for call_index, call_id, name, arguments in parts.new_calls:
            chunks += self._close("reasoning") + self._close("message")
            item = {**_call_item(call_id, name, ""), "status": "in_progress"}
            chunks += self._add(f"call{call_index}", item)
            if arguments:
                chunks += self._arguments(call_index, arguments)
        for call_index, arguments in parts.arguments:
            chunks += self._arguments(call_index, arguments)
        return chunks

    def _arguments(self, call_index: int, delta: str) -> list[str]:
        index, item = self.open[f"call{call_index}"]
        item["arguments"] += delta
        return [self.events.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=delta)]

    def _close(self, key: str) -> list[str]:
        if key not in self.open:
            return []
        index, item = self.open.pop(key)
        text = item.pop("_text", "")
        chunks = []
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
            chunks.append(self.events.send("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=text))
        elif item["type"] == "message":
            item["content"] = [{"type": "output_text", "text": text, "annotations": []}]
            chunks.append(self.events.send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text, logprobs=[]))
            chunks.append(self._part_event("response.content_part.done", text, index, item))
        else:
            chunks.append(self.events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index, name=item["name"], arguments=item["arguments"]))
        item["status"] = "completed"
        if item["type"] == "reasoning":
            item.pop("status")
        chunks.append(self.events.send("response.output_item.done", output_index=index, item=item))
        self.done.append(item)
        return chunks

    def close_all(self) -> list[str]:
        chunks: list[str] = []
        for key in sorted(self.open, key=lambda k: self.open[k][0]):
            chunks += self._close(key)
        return chunks


# -- items <-> messages ------------------------------------------------------------------------------


def input_messages(value: str | list[dict[str, Any]]) -> list[Message]:
    """The Responses input as chat messages: text, messages, function calls and their outputs."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[Message] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message" and "role" in item:
            messages.append({"role": item["role"], "content": _text_of(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or tool_call_id(), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # the model's earlier reasoning is not shown to it again
        else:
            raise BadRequestError(f"input[{i}] of type {kind!r} is not supported: send messages, function_call or function_call_output items", param="input")
    if not messages:
        raise BadRequestError("input is empty: send a text or a list of messages", param="input")
    return messages


def _text_of(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")]
        if len(texts) == len(content):
            return "".join(texts)
    raise BadRequestError(f"input[{i}].content must be a text or a list of input_text parts (images and files are not supported)", param="input")


def output_messages(items: list[dict[str, Any]]) -> list[Message]:
    """A response's output items as the assistant's chat messages (for previous_response_id)."""
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    message: Message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _reasoning_items(view: OutputView) -> list[dict[str, Any]]:
    if not view.reasoning:
        return []
    return [{"type": "reasoning", "id": random_id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": view.reasoning}]}]


def _message_items(view: OutputView) -> list[dict[str, Any]]:
    if not view.content and view.calls:
        return []
    content = [{"type": "output_text", "text": view.content, "annotations": []}]
    return [{"type": "message", "id": random_id("msg"), "status": "completed", "role": "assistant", "content": content}]


def _call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "id": random_id("fc"), "call_id": call_id, "name": name, "arguments": arguments, "status": "completed"}
