"""The engine core in its own process: a loop of drain messages -> step -> send outputs.

The server process spawns `run_engine_core`; from then on the two only exchange the
messages of `engine/messages.py`. The loop blocks on its input socket while there is no
work, and otherwise only peeks at it between steps, so HTTP and tokenization in the
server never stall a step.

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
    from pagedllm.core.request import Request
    from pagedllm.engine.core import EngineCore

logger = logging.getLogger("pagedllm")

_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still there


def run_engine_core(args: EngineArgs, input_address: str, output_address: str, parent_pid: int) -> None:
    """Entry point of the engine core process."""
    # Ctrl-C in a terminal reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    if os.getppid() != parent_pid:
        return  # the server died while this process was starting
    init_logging()
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
    outputs.setsockopt(zmq.LINGER, 2000)  # let a last EngineDead reach the server
    outputs.connect(output_address)
    try:
        exit_code = _run(args, inputs, outputs, parent_pid)
    finally:
        inputs.close(linger=0)
        outputs.close()
        context.term()
    sys.exit(exit_code)


def _run(args: EngineArgs, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> int:
    """Load, report ready, loop; any failure is reported as EngineDead. Returns the exit code."""
    # Imported here, in the engine process: the server process imports this module to name
    # the entry point, and must not load the model code.
    from pagedllm.engine.core import EngineCore

    try:
        core = EngineCore(args)
    except (ValueError, OSError) as e:  # a bad option or model: the message says what to do
        outputs.send(encode(EngineDead(str(e))))
        return 1
    except Exception as e:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        outputs.send(encode(EngineDead(f"{type(e).__name__}: {e}")))
        return 1
    outputs.send(encode(EngineReady(core.info, core.tokenizer, os.getpid())))
    try:
        EngineCoreProc(core, inputs, outputs, parent_pid).run()
    except Exception as e:
        logger.error("engine core failed:\n%s", traceback.format_exc())
        outputs.send(encode(EngineDead(f"{type(e).__name__}: {e}")))
        return 1
    finally:
        core.shutdown()  # tensor-parallel workers
    return 0


class EngineCoreProc:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self.running = True
        self.not_yet_scheduled: dict[str, Request] = {}  # for the queue-time metric

    def run(self) -> None:
        while self.running:
            busy = self.core.has_unfinished_requests()
            changed = self._drain_inputs(timeout_ms=0 if busy else _IDLE_POLL_MS)
            if not self.running:
                return
            if not self.core.has_unfinished_requests():
                if changed:  # aborts freed blocks: let metrics see it now
                    self._send(CoreOutputs([], self.core.stats()))
                elif os.getppid() != self.parent_pid:
                    logger.warning("engine core: the server process is gone, exiting")
                    return
                else:
                    self.core.check_health()  # a tensor-parallel worker that died while idle: EngineDead now
                continue
            step_start = time.monotonic()
            outputs = self.core.step()
            for request_id, message in self.core.take_failed():  # a grammar that did not compile
                self.not_yet_scheduled.pop(request_id, None)
                self._send(RequestFailed(request_id, message))
            logger.debug("engine core: step of %.3f s, %d outputs", time.monotonic() - step_start, len(outputs))
            self._send(CoreOutputs(outputs, self.core.stats(), self._newly_scheduled(step_start)))

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
                try:
                    self.not_yet_scheduled[request.request_id] = self.core.add_request(request)
                except ValueError as e:
                    self._send(RequestFailed(request.request_id, str(e)))
        elif isinstance(message, AbortRequests):
            logger.debug("engine core: aborting %s", message.request_ids)
            self.core.abort(message.request_ids)
            for request_id in message.request_ids:
                self.not_yet_scheduled.pop(request_id, None)
        elif isinstance(message, Shutdown):
            self.running = False
        else:
            raise TypeError(f"engine core got an unknown message {type(message).__name__}")

    def _newly_scheduled(self, step_start: float) -> dict[str, float]:
        # The scheduler sets num_cached_tokens when it first admits a request.
        scheduled = {rid: step_start for rid, r in self.not_yet_scheduled.items() if r.num_cached_tokens >= 0 or r.status.finished}
        for request_id in scheduled:
            del self.not_yet_scheduled[request_id]
        return scheduled

    def _send(self, message) -> None:
        self.outputs.send(encode(message))


def _exit_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when the server process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # the parent-pid check in the idle loop still ends us
