"""What the completions and chat handlers share: model check, SamplingParams from a
request, adding requests to the engine with errors mapped to HTTP, and merging the
streams of several prompts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import fields

from pagedllm.engine.async_client import AsyncEngineClient, EngineDeadError, RequestFailedError, RequestStream
from pagedllm.engine.input_processor import Prompt
from pagedllm.entrypoints.openai.errors import APIError, BadRequestError, EngineUnavailableError, NotFoundError
from pagedllm.entrypoints.openai.protocol import SamplingFields, Usage
from pagedllm.entrypoints.openai.structured import structured_outputs_from
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(requested: str | None, served_name: str) -> None:
    if requested is not None and requested != served_name:
        raise NotFoundError(
            f"model {requested!r} does not exist: this server serves {served_name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except ValueError as e:
        raise BadRequestError(f"logit_bias keys must be token ids (as strings of integers): {e}", param="logit_bias") from e


def sampling_params(
    request: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """The request's sampling options, validated; a bad value is a 400 naming the field.
    `structured_outputs` (from tools) replaces the request's own output constraint."""
    if structured_outputs is None:
        structured_outputs, _ = structured_outputs_from(request)
    if request.stream_options is not None and not request.stream:
        raise BadRequestError("stream_options is only allowed with stream=true", param="stream_options")
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            min_p=request.min_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            logit_bias=_logit_bias(request.logit_bias),
            structured_outputs=structured_outputs,
        )
    except ValueError as e:
        first_word = str(e).split(" ", 1)[0]
        raise BadRequestError(str(e), param=first_word if first_word in _PARAM_NAMES else None) from e


def add_requests(
    client: AsyncEngineClient, request_id: str, prompts: list[Prompt], params: SamplingParams, param: str
) -> list[RequestStream]:
    """One engine request per prompt (ids `<request_id>-<i>` when there are several); all
    or none: if one prompt is refused, those already added are aborted."""
    arrival = time.monotonic()
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(client.add_request(sub_id, prompt, params, arrival))
    except BaseException as e:
        for stream in streams:
            stream.abort()
        raise engine_error(e, param) from e
    return streams


def engine_error(error: BaseException, param: str | None = None) -> BaseException:
    """The HTTP error for what the engine raised (anything else passes through)."""
    if isinstance(error, EngineDeadError):
        return EngineUnavailableError(f"{error}: restart the server")
    if isinstance(error, (ValueError, RequestFailedError)):
        return BadRequestError(str(error), param=param)
    return error


def error_body(error: BaseException) -> APIError:
    mapped = engine_error(error)
    return mapped if isinstance(mapped, APIError) else APIError(f"internal server error ({type(error).__name__}: {error})")


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def count_usage(outputs: list[RequestOutput]) -> Usage:
    """Exact token counts: each prompt once, every generated token of every completion."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return usage(prompt, completion)


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    async def last(stream: RequestStream) -> RequestOutput:
        output = None
        async for output in stream:
            pass
        assert output is not None
        return output

    return list(await asyncio.gather(*(last(s) for s in streams)))


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams, as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, output
    finally:
        for future in pending:
            future.cancel()
