"""POST /v1/chat/completions: messages through the model's chat template, n replies,
streamed (a role chunk, content deltas, a finish chunk per choice) or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_client import AsyncEngineClient, RequestStream
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
)
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
from pagedllm.outputs import CompletionOutput


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict | None = None) -> list[int]:
    """The prompt's token ids: the messages through the tokenizer's chat template."""
    if tokenizer is None:
        raise BadRequestError("the engine runs without a tokenizer (skip_tokenizer_init): chat is not available")
    conversation = [_template_message(m) for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **(template_kwargs or {})
        )
    except ValueError as e:  # transformers: no chat template
        raise BadRequestError(f"{e} Start the server with --chat-template FILE.", param="messages") from e
    except Exception as e:  # a Jinja error inside the template
        raise BadRequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}", param="messages") from e
    # The template already writes any BOS / special tokens it wants.
    return tokenizer.encode(text, add_special_tokens=False)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if out["role"] == "developer":
        out["role"] = "system"
    if isinstance(message.content, list):
        out["content"] = "".join(part.text for part in message.content)
    out.setdefault("content", "")
    return out


class ChatHandler:
    def __init__(self, client: AsyncEngineClient, served_name: str) -> None:
        self.client = client
        self.served_name = served_name

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        check_model(request.model, self.served_name)
        self._check_unsupported(request)
        prompt_ids = render_chat(self.client.tokenizer, request.messages, request.add_generation_prompt, request.chat_template_kwargs)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = sampling_params(request, max_tokens, num_logprobs)
        request_id = random_id("chatcmpl")
        streams = add_requests(self.client, request_id, [prompt_ids], params, param="messages")
        if request.stream:
            return SSEResponse(self._stream(request, request_id, streams[0]), on_close=streams[0].abort)
        try:
            (output,) = await cancel_on_disconnect(raw_request, final_outputs(streams))
        except Exception as e:
            raise error_body(e) from e
        finally:
            streams[0].abort()
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(request, c, 0),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in output.outputs
        ]
        body = ChatCompletionResponse(id=request_id, model=self.served_name, choices=choices, usage=count_usage([output]))
        return JSONResponse(body.model_dump())

    @staticmethod
    def _check_unsupported(request: ChatCompletionRequest) -> None:
        if request.tools and request.tool_choice != "none":
            raise BadRequestError("tool calling is not supported by this server: remove tools", param="tools")
        if request.top_logprobs is not None and not request.logprobs:
            raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")

    def _logprobs(self, request: ChatCompletionRequest, completion: CompletionOutput, start: int):
        if not request.logprobs or completion.logprobs is None:
            return None
        positions = completion.logprobs[start:]
        return chat_logprobs(completion.token_ids[start : start + len(positions)], positions, request.top_logprobs or 0, self._decode)

    def _decode(self, token_id: int) -> str:
        return self.client.tokenizer.decode([token_id])

    async def _stream(self, request: ChatCompletionRequest, request_id: str, stream: RequestStream) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage=None) -> str:
            return event(ChatCompletionChunk(id=request_id, created=created, model=self.served_name, choices=choices, usage=usage))

        n = request.n
        yield chunk([ChatStreamChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n
        output = None
        try:
            async for output in stream:
                choices = []
                for c in output.outputs:
                    if done[c.index]:
                        continue
                    text = stream.text_to_send(c.index)
                    delta, sent_chars[c.index] = text[sent_chars[c.index] :], max(sent_chars[c.index], len(text))
                    logprobs = self._logprobs(request, c, sent_tokens[c.index])
                    if logprobs is not None:
                        sent_tokens[c.index] += len(logprobs.content)
                    done[c.index] = c.finish_reason is not None
                    if delta or done[c.index] or (logprobs is not None and logprobs.content):
                        choices.append(
                            ChatStreamChoice(
                                index=c.index,
                                delta=Delta(content=delta) if delta else Delta(),
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason,
                            )
                        )
                if choices:
                    yield chunk(choices)
            if request.stream_options is not None and request.stream_options.include_usage and output is not None:
                yield chunk([], usage=count_usage([output]))
        except Exception as e:
            yield event(error_body(e).body())
        yield DONE
