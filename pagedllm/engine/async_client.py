"""AsyncEngineClient: the server's handle on an engine core running in its own process.

    server process (asyncio)                               engine core process
    ───────────────────────────────────────                ───────────────────────
    add_request: tokenize, resolve params ──AddRequests──►  drain inputs
                 (InputProcessor)                            step() while work
    output loop: detokenize, stop strings ◄──CoreOutputs──   send outputs + stats
                 (OutputProcessor) -> RequestStream of each request

Outputs are cumulative RequestOutputs, so a stream keeps only the latest one: a slow
reader skips ahead, loses nothing, and sends what it skipped in one chunk. When the core
process dies, every open stream fails with EngineDeadError and later requests are refused
with it; nothing waits forever.

A client either starts its core (`start`: one API server, which owns it) or connects to one
that the server's parent started (`connect`, with several API servers: front end k of K).
Requests carry the front end's index, so the core sends each one's outputs back to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import zmq
import zmq.asyncio

from pagedllm.config import EngineArgs
from pagedllm.engine.core_handle import EngineCoreAddress, EngineCoreHandle, ProcessWatch, exit_message
from pagedllm.engine.input_processor import InputProcessor, Prompt
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreOutputs,
    EngineDead,
    EngineInfo,
    EngineReady,
    EngineStats,
    RequestFailed,
    decode,
    encode,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.request_timing import RequestTiming
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

_LIVENESS_POLL_MS = 500  # how often a quiet output loop checks that the core process lives
_MAX_MESSAGES_PER_TURN = 64  # engine messages handled before the streams' readers get a turn


class EngineDeadError(RuntimeError):
    """The engine core process is gone; the server must be restarted."""


class EngineStartError(RuntimeError):
    """The engine core process could not load the model (the message says why)."""


class RequestFailedError(RuntimeError):
    """The engine core refused one request."""


class StatsObserver(Protocol):
    """What the client reports (pagedllm.metrics.EngineMetrics implements it)."""

    def record_stats(self, stats: EngineStats) -> None: ...

    def record_tokens(self, num_prompt_tokens: int, num_generation_tokens: int) -> None: ...

    def record_finished(self, timing: RequestTiming, finish_reason: str) -> None: ...

    def record_dead(self) -> None: ...


class RequestStream:
    """The outputs of one request, as an async iterator of (cumulative) RequestOutputs."""

    def __init__(self, request_id: str, client: AsyncEngineClient, core_ids: list[str], timing: RequestTiming) -> None:
        self.request_id = request_id
        self.core_ids = core_ids
        self.timing = timing
        self.outstanding_tokens = 0  # prompt + tokens still to generate, while open (for routing)
        self.finished = False
        self._client = client
        self._latest: RequestOutput | None = None
        self._error: Exception | None = None
        self._ready = asyncio.Event()

    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self._ready.set()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            self.finished = True
            raise self._error
        assert self._latest is not None
        self.finished = self._latest.finished
        return self._latest

    def text_to_send(self, index: int) -> str:
        """The text of completion `index` a stream may send now (a possible start of a stop
        string is held back until it is decided)."""
        text = self._client.outputs.text_to_send(self.request_id, index)
        return self._latest.outputs[index].text if text is None else text

    def abort(self) -> None:
        """Stop generating (idempotent; a no-op once finished)."""
        self._client.abort(self.request_id)


class AsyncEngineClient:
    def __init__(
        self, process, ready: EngineReady, sockets: _Sockets, front_end: int, owned: EngineCoreHandle | None
    ) -> None:
        self.process = process  # is_alive(), pid, exitcode: the core's multiprocessing.Process, or a ProcessWatch
        self.info: EngineInfo = ready.info
        self.tokenizer = ready.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.info)
        self.outputs = OutputProcessor(self.tokenizer)
        self.latest_stats: EngineStats | None = None
        self.stats_observer: StatsObserver | None = None  # set by observe(), once info names the model
        self.num_outstanding_tokens = 0  # over the open requests: what a data-parallel router balances
        self.front_end = front_end
        self._owned = owned
        self._sockets = sockets
        self._streams: dict[str, RequestStream] = {}
        self._parent_of: dict[str, str] = {}  # core request id -> request id
        self._dead: EngineDeadError | None = None
        self._output_task = asyncio.get_running_loop().create_task(self._output_loop(), name="engine-output-loop")

    # -- life cycle ------------------------------------------------------------------------------

    @classmethod
    async def start(cls, args: EngineArgs, env: dict[str, str] | None = None) -> AsyncEngineClient:
        """Spawn the engine core process and wait until its model is loaded. `env`: variables
        the core process sets before it starts (a data-parallel replica's devices and threads)."""
        core = EngineCoreHandle.start(args, num_front_ends=1, env=env)
        try:
            return await cls._connect(core.address, 0, core.process, owned=core)
        except BaseException:
            await asyncio.to_thread(core.stop)
            raise

    @classmethod
    async def connect(cls, address: EngineCoreAddress, front_end: int) -> AsyncEngineClient:
        """Reach a core that another process started, as front end `front_end` of its
        output_addresses; wait until its model is loaded."""
        return await cls._connect(address, front_end, ProcessWatch(address.pid), owned=None)

    @classmethod
    async def _connect(cls, address: EngineCoreAddress, front_end: int, process, owned: EngineCoreHandle | None) -> AsyncEngineClient:
        sockets = _Sockets(address.input_address, address.output_addresses[front_end])
        try:
            ready = await _wait_ready(process, sockets.output)
        except BaseException:
            sockets.close()
            raise
        if front_end == 0:  # once per core
            logger.info("engine core process %d is ready", ready.pid)
        return cls(process, ready, sockets, front_end, owned)

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine is gone, or None while it runs."""
        if self._dead is None and not self.process.is_alive():
            self._die(EngineDeadError(exit_message(self.process)))
        return self._dead

    @property
    def health_error(self) -> EngineDeadError | None:
        """Why /health fails, or None."""
        return self.dead_error

    def observe(self, metrics) -> None:
        """Report to a server's metrics (pagedllm.metrics.ServerMetrics)."""
        self.stats_observer = metrics.engine(0)

    async def shutdown(self, timeout: float = 2.0) -> None:
        """Fail what is still open; end the core process if this client started it (asking
        first, then terminating)."""
        self._output_task.cancel()
        if self._owned is not None:
            await asyncio.to_thread(self._owned.stop, timeout)
        self._die(EngineDeadError("the server is shutting down"))
        self._sockets.close()
        if isinstance(self.process, ProcessWatch):
            self.process.close()

    # -- requests --------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> RequestStream:
        """Tokenize, check and queue a request. Raises ValueError for a prompt or params
        the engine cannot take (the message says what to change), EngineDeadError once the
        engine is gone."""
        if self.dead_error is not None:
            raise self.dead_error
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.inputs.tokenize(prompt)
        params = self.inputs.resolve_params(params, len(prompt_ids))
        requests = self.inputs.make_requests(request_id, prompt_ids, params)
        core_ids = self.outputs.add_request(request_id, text, prompt_ids, params)
        timing = RequestTiming(arrival_time if arrival_time is not None else time.monotonic(), len(prompt_ids))
        stream = RequestStream(request_id, self, core_ids, timing)
        stream.outstanding_tokens = len(prompt_ids) + params.max_tokens * params.n
        self.num_outstanding_tokens += stream.outstanding_tokens
        self._streams[request_id] = stream
        self._parent_of.update((core_id, request_id) for core_id in core_ids)
        try:
            self._send(AddRequests(requests, self.front_end))
        except EngineDeadError:
            self._forget(stream)
            self.outputs.abort(request_id)
            raise
        if self.stats_observer is not None:
            self.stats_observer.record_tokens(len(prompt_ids), 0)
        return stream

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._forget(stream)
        live_core_ids = self.outputs.abort(request_id)
        logger.debug("aborting request %s (core ids %s)", request_id, live_core_ids)
        if live_core_ids and self._dead is None:
            try:
                self._send(AbortRequests(live_core_ids))
            except EngineDeadError:
                pass  # nothing left to abort; the output loop reports the death
        self._report_finished(stream, "abort")

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    def abort_all(self) -> None:
        """End every open request now, each with finish_reason "abort" (a server shutting down)."""
        for request_id, stream in list(self._streams.items()):
            output = self.outputs.finish_aborted(request_id)
            self.abort(request_id)
            if output is not None:
                stream._put(output)

    def _send(self, message) -> None:
        try:
            self._sockets.input.send(encode(message), zmq.NOBLOCK)  # queues while the core is away (the input connects)
        except zmq.ZMQError as e:
            raise EngineDeadError(f"cannot reach the engine core process: {e}") from e

    # -- the output loop -------------------------------------------------------------------------

    async def _output_loop(self) -> None:
        output = self._sockets.output
        try:
            while True:
                if not await output.poll(_LIVENESS_POLL_MS):
                    if not self.process.is_alive():
                        raise EngineDeadError(exit_message(self.process))
                    continue
                # Handle every message that has arrived before any stream's reader runs: a
                # reader that fell behind the engine then sends the tokens of several steps in one
                # chunk, which costs less per token the further behind it is.
                for _ in range(_MAX_MESSAGES_PER_TURN):
                    try:
                        data = await output.recv(zmq.NOBLOCK)  # a finished future: no turn taken
                    except zmq.Again:
                        break
                    self._handle(decode(data))
        except asyncio.CancelledError:
            raise
        except EngineDeadError as e:
            logger.error("%s", e)
            self._die(e)
        except Exception as e:
            logger.exception("the engine output loop failed")
            self._die(EngineDeadError(f"the engine output loop failed: {type(e).__name__}: {e}"))

    def _handle(self, message) -> None:
        if isinstance(message, CoreOutputs):
            self._handle_outputs(message)
        elif isinstance(message, RequestFailed):
            self._handle_failed(message)
        elif isinstance(message, EngineDead):
            raise EngineDeadError(f"the engine core failed: {message.message}")

    def _handle_outputs(self, message: CoreOutputs) -> None:
        now = time.monotonic()
        for core_id, scheduled in message.first_scheduled.items():
            stream = self._streams.get(self._parent_of.get(core_id, ""))
            if stream is not None and stream.timing.scheduled is None:
                stream.timing.scheduled = scheduled
        new_tokens: dict[str, int] = {}
        for out in message.outputs:
            parent = self._parent_of.get(out.request_id)
            if parent is not None:
                new_tokens[parent] = new_tokens.get(parent, 0) + len(out.new_token_ids)
        changed, stopped = self.outputs.process(message.outputs)
        if stopped:
            self._send(AbortRequests(stopped))
        for output in changed:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            longest = max(len(c.token_ids) for c in output.outputs)
            generated = min(new_tokens.get(output.request_id, 0), stream.outstanding_tokens)
            stream.outstanding_tokens -= generated
            self.num_outstanding_tokens -= generated
            stream.timing.record_tokens(now, new_tokens.get(output.request_id, 0), longest)
            stream._put(output)
            if output.finished:
                self._forget(stream)
                self._report_finished(stream, output.outputs[0].finish_reason or "stop")
        self.latest_stats = message.stats
        if self.stats_observer is not None:
            self.stats_observer.record_tokens(0, sum(new_tokens.values()))
            self.stats_observer.record_stats(message.stats)

    def _handle_failed(self, message: RequestFailed) -> None:
        parent = self._parent_of.get(message.request_id)
        stream = self._streams.get(parent) if parent is not None else None
        if stream is not None:
            self.abort(stream.request_id)
            stream._fail(RequestFailedError(message.message))

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None:
            self.num_outstanding_tokens -= stream.outstanding_tokens
            stream.outstanding_tokens = 0
        for core_id in stream.core_ids:
            self._parent_of.pop(core_id, None)

    def _report_finished(self, stream: RequestStream, reason: str) -> None:
        stream.timing.finished = time.monotonic()
        if self.stats_observer is not None:
            self.stats_observer.record_finished(stream.timing, reason)

    def _die(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
            if self.stats_observer is not None:
                self.stats_observer.record_dead()
        streams, self._streams = list(self._streams.values()), {}
        self._parent_of.clear()
        self.num_outstanding_tokens = 0
        for stream in streams:
            stream._fail(self._dead)


class _Sockets:
    """The two zmq sockets of one front end to one core: requests go to the core's input
    (connected, so sends queue and never block the event loop); outputs come to this front
    end's own output address (bound here)."""

    def __init__(self, input_address: str, output_address: str) -> None:
        self.sync_context = zmq.Context()
        self.async_context = zmq.asyncio.Context()
        self.input = self.sync_context.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.connect(input_address)
        self.output = self.async_context.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.output.bind(output_address)

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.sync_context.term()
        self.async_context.term()


async def _wait_ready(process, output: zmq.asyncio.Socket) -> EngineReady:
    while True:
        if await output.poll(_LIVENESS_POLL_MS):
            message = decode(await output.recv())
            if isinstance(message, EngineReady):
                return message
            if isinstance(message, EngineDead):
                raise EngineStartError(f"the engine failed to start: {message.message}")
        elif not process.is_alive():
            raise EngineStartError(f"the engine failed to start: {exit_message(process)}; see its log above")
