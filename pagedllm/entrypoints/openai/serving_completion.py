"""POST /v1/completions: one or several prompts (texts or token ids), n completions each,
streamed or not. Choice `i * n + j` is completion j of prompt i, as in OpenAI's API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_client import AsyncEngineClient, RequestStream
from pagedllm.engine.input_processor import Prompt
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.logprobs import append_completion_logprobs
from pagedllm.entrypoints.openai.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from pagedllm.entrypoints.openai.serving_common import (
    add_requests,
    check_model,
    count_usage,
    error_body,
    final_outputs,
    merge,
    random_id,
    sampling_params,
)
from pagedllm.entrypoints.openai.sse import DONE, SSEResponse, cancel_on_disconnect, event
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _ChoiceState:
    """What a stream has sent of one choice."""

    started: bool = False
    chars: int = 0  # of the completion text
    tokens: int = 0  # logprob positions
    text_offset: int = 0
    done: bool = False


class CompletionHandler:
    def __init__(self, client: AsyncEngineClient, served_name: str) -> None:
        self.client = client
        self.served_name = served_name

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        check_model(request.model, self.served_name)
        if request.suffix:
            raise BadRequestError("suffix is not supported by this server: remove it", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise BadRequestError("best_of is not supported: leave it out (or equal to n)", param="best_of")
        prompts = _prompt_list(request.prompt)
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = sampling_params(request, request.max_tokens, request.logprobs, prompt_logprobs=echo_logprobs)
        request_id = random_id("cmpl")
        streams = add_requests(self.client, request_id, prompts, params, param="prompt")

        def abort_all() -> None:
            for stream in streams:
                stream.abort()

        if request.stream:
            return SSEResponse(self._stream(request, request_id, streams), on_close=abort_all)
        try:
            outputs = await cancel_on_disconnect(raw_request, final_outputs(streams))
        except Exception as e:
            raise error_body(e) from e
        finally:
            abort_all()
        choices = [self._choice(request, i * request.n + c.index, output, c) for i, output in enumerate(outputs) for c in output.outputs]
        body = CompletionResponse(id=request_id, model=self.served_name, choices=choices, usage=count_usage(outputs))
        return JSONResponse(body.model_dump())

    def _choice(self, request: CompletionRequest, index: int, output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
        prompt_text = self._prompt_text(output) if request.echo else ""
        logprobs = None
        if request.logprobs is not None:
            logprobs = CompletionLogprobs()
            offset = 0
            if request.echo:
                offset = append_completion_logprobs(
                    logprobs, output.prompt_token_ids, output.prompt_logprobs or [], request.logprobs, self._decode, 0
                )
            append_completion_logprobs(logprobs, completion.token_ids, completion.logprobs or [], request.logprobs, self._decode, offset)
        return CompletionChoice(
            index=index,
            text=prompt_text + completion.text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )

    async def _stream(self, request: CompletionRequest, request_id: str, streams: list[RequestStream]) -> AsyncIterator[str]:
        created = int(time.time())
        states = [_ChoiceState() for _ in range(len(streams) * request.n)]
        last: dict[int, RequestOutput] = {}
        try:
            async for i, output in merge(streams):
                last[i] = output
                choices = []
                for completion in output.outputs:
                    index = i * request.n + completion.index
                    if not states[index].done:
                        choice = self._delta(request, states[index], index, streams[i], output, completion)
                        if choice is not None:
                            choices.append(choice)
                if choices:
                    yield event(CompletionResponse(id=request_id, created=created, model=self.served_name, choices=choices))
            if request.stream_options is not None and request.stream_options.include_usage:
                outputs = [last[i] for i in sorted(last)]
                yield event(CompletionResponse(id=request_id, created=created, model=self.served_name, choices=[], usage=count_usage(outputs)))
        except Exception as e:
            yield event(error_body(e).body())
        yield DONE

    def _delta(
        self, request: CompletionRequest, state: _ChoiceState, index: int, stream: RequestStream,
        output: RequestOutput, completion: CompletionOutput,
    ) -> CompletionChoice | None:
        """What this choice gained since the last chunk, or None if nothing."""
        text = stream.text_to_send(completion.index)
        delta, state.chars = text[state.chars :], max(state.chars, len(text))
        echo_now = request.echo and not state.started
        state.started = True
        logprobs = None
        if request.logprobs is not None:
            logprobs = CompletionLogprobs()
            if echo_now:
                state.text_offset = append_completion_logprobs(
                    logprobs, output.prompt_token_ids, output.prompt_logprobs or [], request.logprobs, self._decode, 0
                )
            positions = (completion.logprobs or [])[state.tokens :]
            token_ids = completion.token_ids[state.tokens : state.tokens + len(positions)]
            state.text_offset = append_completion_logprobs(
                logprobs, token_ids, positions, request.logprobs, self._decode, state.text_offset
            )
            state.tokens += len(positions)
        if echo_now:
            delta = self._prompt_text(output) + delta
        state.done = completion.finish_reason is not None
        if not delta and not state.done and not (logprobs and logprobs.tokens):
            return None
        return CompletionChoice(
            index=index, text=delta, logprobs=logprobs, finish_reason=completion.finish_reason, stop_reason=completion.stop_reason
        )

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return "" if self.client.tokenizer is None else self.client.tokenizer.decode(output.prompt_token_ids)

    def _decode(self, token_id: int) -> str:
        return "" if self.client.tokenizer is None else self.client.tokenizer.decode([token_id])


def _prompt_list(prompt) -> list[Prompt]:
    """A text, a list of texts, token ids, or a list of token-id lists -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequestError("prompt must not be empty: give a text, a list of texts or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)
