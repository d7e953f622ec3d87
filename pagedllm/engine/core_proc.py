"""The engine core in its own process: a loop of drain messages -> step -> send outputs.

The server process spawns `run_engine_core` (engine/core_handle.py); from then on the
core and its front ends only exchange the messages of `engine/messages.py`. The loop blocks
on its input socket while there is no work, and otherwise only peeks at it between steps, so
HTTP and tokenization in the server never stall a step. With several front ends (API server
processes) the core has one output socket per front end and remembers which front end added
each request.

The process ends on a Shutdown message, when its parent disappears (so a killed server
leaves no orphan), or after reporting an error it cannot recover from (EngineDead).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING

import zmq

from pagedllm.config import EngineArgs
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreOutputs,
    EngineDead,
    EngineReady,
    RequestFailed,
    Shutdown,
    decode,
    encode,
)
from pagedllm.logger import init_logging

if TYPE_CHECKING:
    from pagedllm.core.interface import EngineCoreOutput
    from pagedllm.engine.core import EngineCore

logger = logging.getLogger("pagedllm")

_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still there


def run_engine_core(args: EngineArgs, input_address: str, output_addresses: tuple[str, ...], parent_pid: int) -> None:
    """Entry point of the engine core process; output_addresses: one per front end."""
    # Ctrl-C in a terminal reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    if os.getppid() != parent_pid:
        return  # the server died while this process was starting
    init_logging()
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.bind(input_address)
    outputs = [context.socket(zmq.PUSH) for _ in output_addresses]
    for socket, address in zip(outputs, output_addresses):
        socket.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
        socket.setsockopt(zmq.LINGER, 2000)  # let a last EngineDead reach the server
        socket.connect(address)
    exit_code = 1
    try:
        exit_code = _run(args, inputs, outputs, parent_pid)
    finally:
        inputs.close(linger=0)
        for socket in outputs:  # after a Shutdown nobody reads; a last EngineDead may take 2 s to get through
            socket.close(linger=0 if exit_code == 0 else None)
        context.term()
    # Exit now: the interpreter's teardown of a model and a large KV cache takes seconds
    # (1.9 s for the tiny model and 1 GiB of cache) that a stopping server would wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _run(args: EngineArgs, inputs: zmq.Socket, outputs: list[zmq.Socket], parent_pid: int) -> int:
    """Load, report ready, loop; any failure is reported as EngineDead. Returns the exit code."""
    # Imported here, in the engine process: the server process imports this module to name
    # the entry point, and must not load the model code.
    from pagedllm.engine.core import EngineCore

    try:
        core = EngineCore(args)
    except (ValueError, OSError) as e:  # a bad option or model: the message says what to do
        _broadcast(outputs, EngineDead(str(e)))
        return 1
    except Exception as e:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        _broadcast(outputs, EngineDead(f"{type(e).__name__}: {e}"))
        return 1
    _broadcast(outputs, EngineReady(core.info, core.tokenizer, os.getpid()))
    try:
        EngineCoreProc(core, inputs, outputs, parent_pid).run()
    except Exception as e:
        logger.error("engine core failed:\n%s", traceback.format_exc())
        _broadcast(outputs, EngineDead(f"{type(e).__name__}: {e}"))
        return 1
    finally:
        core.shutdown()  # tensor-parallel workers
    return 0


def _broadcast(outputs: list[zmq.Socket], message) -> None:
    data = encode(message)
    for socket in outputs:
        socket.send(data)


class EngineCoreProc:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: list[zmq.Socket], parent_pid: int) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs  # by front-end index
        self.parent_pid = parent_pid
        self.running = True
        self.not_yet_scheduled: set[str] = set()  # for the queue-time metric
        self.front_end_of: dict[str, int] = {}  # core request id -> the front end that added it, until it ends

    def run(self) -> None:
        while self.running:
            busy = self.core.has_unfinished_requests()
            changed = self._drain_inputs(timeout_ms=0 if busy else _IDLE_POLL_MS)
            if not self.running:
                return
            if not self.core.has_unfinished_requests():
                if changed:  # aborts freed blocks: let metrics see it now
                    self._send_outputs([], {})
                elif os.getppid() != self.parent_pid:
                    logger.warning("engine core: the server process is gone, exiting")
                    return
                else:
                    self.core.check_health()  # a tensor-parallel worker that died while idle: EngineDead now
                continue
            step_start = time.monotonic()
            outputs = self.core.step()
            for request_id, message in self.core.take_failed():  # a grammar that did not compile
                self.not_yet_scheduled.discard(request_id)
                self._fail(request_id, message)
            logger.debug("engine core: step of %.3f s, %d outputs", time.monotonic() - step_start, len(outputs))
            self._send_outputs(outputs, self._newly_scheduled(step_start))

    def _drain_inputs(self, timeout_ms: int) -> bool:
        """Handle every waiting message; wait up to timeout_ms for the first one."""
        handled = False
        while self.inputs.poll(timeout_ms if not handled else 0):
            self._handle(decode(self.inputs.recv()))
            handled = True
            if not self.running:
                break
        return handled

    def _handle(self, message) -> None:
        if isinstance(message, AddRequests):
            for request in message.requests:
                self.front_end_of[request.request_id] = message.front_end
                try:
                    self.core.add_request(request)
                    self.not_yet_scheduled.add(request.request_id)
                except ValueError as e:
                    self._fail(request.request_id, str(e))
        elif isinstance(message, AbortRequests):
            logger.debug("engine core: aborting %s", message.request_ids)
            self.core.abort(message.request_ids)
            for request_id in message.request_ids:
                self.not_yet_scheduled.discard(request_id)
                self.front_end_of.pop(request_id, None)
        elif isinstance(message, Shutdown):
            self.running = False
        else:
            raise TypeError(f"engine core got an unknown message {type(message).__name__}")

    def _newly_scheduled(self, step_start: float) -> dict[str, float]:
        """The requests this step's scheduling admitted for the first time, at the step's start.
        (From the scheduler's own list: a burst of thousands of waiting requests is not walked
        every step.)"""
        first = [rid for rid in self.core.admitted if rid in self.not_yet_scheduled]
        self.not_yet_scheduled.difference_update(first)
        return dict.fromkeys(first, step_start)

    def _send_outputs(self, outputs: list[EngineCoreOutput], first_scheduled: dict[str, float]) -> None:
        """One CoreOutputs to every front end: its own requests' outputs, and the stats."""
        per_front_end = [CoreOutputs([], self.core.stats(), {}) for _ in self.outputs]
        for request_id, at in first_scheduled.items():
            per_front_end[self.front_end_of.get(request_id, 0)].first_scheduled[request_id] = at
        for out in outputs:
            front_end = self.front_end_of.pop(out.request_id, None) if out.finished else self.front_end_of.get(out.request_id)
            if front_end is not None:  # None: the request already failed, and its front end knows
                per_front_end[front_end].outputs.append(out)
        for socket, message in zip(self.outputs, per_front_end):
            socket.send(encode(message))

    def _fail(self, request_id: str, message: str) -> None:
        front_end = self.front_end_of.pop(request_id, 0)
        self.outputs[front_end].send(encode(RequestFailed(request_id, message)))


def exit_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when the server process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # the parent-pid check in the idle loop still ends us
