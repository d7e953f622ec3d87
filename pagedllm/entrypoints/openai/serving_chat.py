"""POST /v1/chat/completions: messages through the model's chat template, n replies,
streamed (a role chunk, deltas, a finish chunk per choice) or not; tools, tool_choice and
the reasoning parser shape each reply (see chat_output.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_client import AsyncEngineClient, RequestStream
from pagedllm.entrypoints.openai.chat_output import ChatOutputParser, DeltaParts, StreamDiffer, tool_call_id
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from pagedllm.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser
from pagedllm.entrypoints.openai.serving_common import (
    add_requests,
    check_model,
    count_usage,
    error_body,
    final_outputs,
    random_id,
    sampling_params,
)
from pagedllm.entrypoints.openai.sse import DONE, SSEResponse, cancel_on_disconnect, event
from pagedllm.entrypoints.openai.structured import structured_outputs_from
from pagedllm.entrypoints.openai.tools import ToolOptions, ToolPlan, plan_tools, template_messages_arguments
from pagedllm.outputs import CompletionOutput


@dataclass(frozen=True)
class ChatOptions:
    """How the server shapes chat replies (its command-line options)."""

    tools: ToolOptions = ToolOptions()
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}: choose one of {', '.join(REASONING_PARSERS)}")

    @property
    def reasoning(self) -> ReasoningParser | None:
        return REASONING_PARSERS[self.reasoning_parser] if self.reasoning_parser else None


def render_chat(
    tokenizer,
    messages: list[ChatMessage] | list[dict[str, Any]],
    add_generation_prompt: bool,
    template_kwargs: dict | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt's token ids: the messages (and tools) through the tokenizer's chat template."""
    if tokenizer is None:
        raise BadRequestError("the engine runs without a tokenizer (skip_tokenizer_init): chat is not available")
    conversation = [_template_message(m) for m in messages]
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    except ValueError as e:  # transformers: no chat template
        raise BadRequestError(f"{e} Start the server with --chat-template FILE.", param="messages") from e
    except Exception as e:  # a Jinja error inside the template
        raise BadRequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}", param="messages") from e
    # The template already writes any BOS / special tokens it wants.
    return tokenizer.encode(text, add_special_tokens=False)


def _template_message(message: ChatMessage | dict[str, Any]) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True) if isinstance(message, ChatMessage) else dict(message)
    if out["role"] == "developer":
        out["role"] = "system"
    if isinstance(out.get("content"), list):
        out["content"] = "".join(part["text"] for part in out["content"])
    if out.get("content") is None:
        out["content"] = ""
    return template_messages_arguments(out)


def chat_tool_plan(request: ChatCompletionRequest, options: ToolOptions) -> ToolPlan:
    choice = request.tool_choice
    named = choice.function.name if choice is not None and not isinstance(choice, str) else None
    tools = [t.function for t in request.tools] if request.tools else None
    return plan_tools(tools, choice if isinstance(choice, str) else None, named, request.parallel_tool_calls, options)


class ChatHandler:
    def __init__(self, client: AsyncEngineClient, served_name: str, options: ChatOptions = ChatOptions()) -> None:
        self.client = client
        self.served_name = served_name
        self.options = options

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        check_model(request.model, self.served_name)
        if request.top_logprobs is not None and not request.logprobs:
            raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        plan = chat_tool_plan(request, self.options.tools)
        if plan.constraint is not None and structured_outputs_from(request)[0] is not None:
            raise BadRequestError("a required or named tool_choice cannot be combined with another output constraint", param="tool_choice")
        prompt_ids = render_chat(
            self.client.tokenizer, request.messages, request.add_generation_prompt, request.chat_template_kwargs, plan.template_tools
        )
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = sampling_params(request, max_tokens, num_logprobs, structured_outputs=plan.constraint)
        request_id = random_id("chatcmpl")
        streams = add_requests(self.client, request_id, [prompt_ids], params, param="messages")
        parser = ChatOutputParser(plan, self.options.reasoning)
        if request.stream:
            return SSEResponse(self._stream(request, request_id, streams[0], parser), on_close=streams[0].abort)
        try:
            (output,) = await cancel_on_disconnect(raw_request, final_outputs(streams))
        except Exception as e:
            raise error_body(e) from e
        finally:
            streams[0].abort()
        choices = [self._choice(request, parser, c) for c in output.outputs]
        body = ChatCompletionResponse(id=request_id, model=self.served_name, choices=choices, usage=count_usage([output]))
        return JSONResponse(body.model_dump(exclude_none=False))

    def _choice(self, request: ChatCompletionRequest, parser: ChatOutputParser, c: CompletionOutput) -> ChatChoice:
        view = parser.view(c.text, final=True)
        calls = [ToolCall(id=tool_call_id(), function=FunctionCall(name=name, arguments=args)) for name, args in view.calls]
        message = AssistantMessage(
            content=view.content if view.content or not calls else None,
            reasoning_content=view.reasoning or None,
            reasoning=view.reasoning or None,
            tool_calls=calls,
        )
        return ChatChoice(
            index=c.index,
            message=message,
            logprobs=self._logprobs(request, c, 0),
            finish_reason=_finish_reason(c.finish_reason, bool(calls)),
            stop_reason=c.stop_reason,
        )

    def _logprobs(self, request: ChatCompletionRequest, completion: CompletionOutput, start: int):
        if not request.logprobs or completion.logprobs is None:
            return None
        positions = completion.logprobs[start:]
        return chat_logprobs(completion.token_ids[start : start + len(positions)], positions, request.top_logprobs or 0, self._decode)

    def _decode(self, token_id: int) -> str:
        return self.client.tokenizer.decode([token_id])

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, stream: RequestStream, parser: ChatOutputParser
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage=None) -> str:
            return event(ChatCompletionChunk(id=request_id, created=created, model=self.served_name, choices=choices, usage=usage))

        n = request.n
        yield chunk([ChatStreamChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        differs, sent_tokens, done = [StreamDiffer() for _ in range(n)], [0] * n, [False] * n
        output = None
        try:
            async for output in stream:
                choices = []
                for c in output.outputs:
                    if done[c.index]:
                        continue
                    done[c.index] = c.finish_reason is not None
                    text = c.text if done[c.index] else stream.text_to_send(c.index)
                    parts = differs[c.index].delta(parser.view(text, final=done[c.index]))
                    logprobs = self._logprobs(request, c, sent_tokens[c.index])
                    if logprobs is not None:
                        sent_tokens[c.index] += len(logprobs.content)
                    if parts or done[c.index] or (logprobs is not None and logprobs.content):
                        reason = _finish_reason(c.finish_reason, bool(differs[c.index].calls)) if done[c.index] else None
                        choices.append(
                            ChatStreamChoice(
                                index=c.index, delta=_delta(parts), logprobs=logprobs, finish_reason=reason, stop_reason=c.stop_reason
                            )
                        )
                if choices:
                    yield chunk(choices)
            if request.stream_options is not None and request.stream_options.include_usage and output is not None:
                yield chunk([], usage=count_usage([output]))
        except Exception as e:
            yield event(error_body(e).body())
        yield DONE


def _delta(parts: DeltaParts) -> Delta:
    calls = [
        DeltaToolCall(index=i, id=call_id, type="function", function=DeltaFunctionCall(name=name, arguments=args))
        for i, call_id, name, args in parts.new_calls
    ] + [DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=args)) for i, args in parts.arguments]
    return Delta(
        content=parts.content or None,
        reasoning_content=parts.reasoning or None,
        reasoning=parts.reasoning or None,
        tool_calls=calls or None,
    )


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason
