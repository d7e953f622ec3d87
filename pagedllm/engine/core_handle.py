"""Starting and stopping an engine core process, and what a front end needs to reach one.

    owner (the server process; with several API servers, their parent)
      EngineCoreHandle.start ──spawn──► engine core process (engine/core_proc.py)
        <folder>/input        bound by the core (PULL); each front end and the owner connect a PUSH
        <folder>/output-<k>   bound by front end k (PULL); the core connects one PUSH to each
      EngineCoreHandle.stop: Shutdown on the input, then terminate, then kill

ZeroMQ lets either side connect before the other binds (messages wait in the connecting
side's queue), so the core and its front ends may start in any order. A front end gets an
EngineCoreAddress (plain, picklable data): the addresses and the core's pid, by which it
tells when a core that another process started is gone (ProcessWatch).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import shutil
import tempfile
from dataclasses import dataclass

import zmq

from pagedllm.config import EngineArgs
from pagedllm.engine.core_proc import run_engine_core
from pagedllm.engine.messages import Shutdown, encode

logger = logging.getLogger("pagedllm")


@dataclass(frozen=True)
class EngineCoreAddress:
    input_address: str
    output_addresses: tuple[str, ...]  # by front-end index
    pid: int


class EngineCoreHandle:
    """An engine core process this process started (and must stop)."""

    def __init__(self, process, address: EngineCoreAddress, folder: str) -> None:
        self.process = process
        self.address = address
        self._folder = folder
        self._context = zmq.Context()
        self._control = self._context.socket(zmq.PUSH)  # for Shutdown
        self._control.connect(address.input_address)

    @classmethod
    def start(cls, args: EngineArgs, num_front_ends: int = 1, env: dict[str, str] | None = None) -> EngineCoreHandle:
        """Spawn the core; it loads the model and then reports EngineReady to every front end.
        `env`: variables the core sets before it starts (a data-parallel replica's devices and threads)."""
        folder = tempfile.mkdtemp(prefix="pagedllm-")
        input_address = f"ipc://{folder}/input"
        output_addresses = tuple(f"ipc://{folder}/output-{k}" for k in range(num_front_ends))
        process = multiprocessing.get_context("spawn").Process(
            target=_run_engine_core_with,
            args=(env or {}, args, input_address, output_addresses, os.getpid()),
            name="pagedllm-engine-core",
        )
        process.start()
        return cls(process, EngineCoreAddress(input_address, output_addresses, process.pid), folder)

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the core to stop, wait up to `timeout`, then terminate it; remove its sockets' folder."""
        if self.process.is_alive():
            try:
                self._control.send(encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            stop_process(self.process, timeout)
        self._control.close(linger=0)
        self._context.term()
        shutil.rmtree(self._folder, ignore_errors=True)


class ProcessWatch:
    """is_alive() of a process that another one started (a sibling, so no exit code): a pidfd
    turns readable when the process exits (Linux); elsewhere, a signal-0 probe."""

    exitcode = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._gone = False
        if hasattr(os, "pidfd_open"):
            try:
                self._fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._gone = True

    def is_alive(self) -> bool:
        if self._gone:
            return False
        if self._fd is not None:
            self._gone = bool(select.select([self._fd], [], [], 0)[0])
        else:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self._gone = True
        return not self._gone

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _run_engine_core_with(env: dict[str, str], *args) -> None:
    """The core process's entry: set `env` (before anything initializes CUDA or OpenMP), then run."""
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    run_engine_core(*args)


def stop_process(process, timeout: float) -> None:
    """Wait for a process asked to stop; then terminate it; then kill it."""
    process.join(timeout)
    if process.is_alive():
        logger.warning("%s process %d did not stop in %.0f s: terminating it", process.name, process.pid, timeout)
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def exit_message(process) -> str:
    code = f" with code {process.exitcode}" if process.exitcode is not None else ""
    return f"the engine core process (pid {process.pid}) exited{code}"
