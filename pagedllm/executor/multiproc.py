"""MultiprocExecutor: one process per tensor-parallel rank, driven by the engine core.

    engine core (driver, holds no rank)              worker processes, ranks 0 .. N-1
      sample_tokens(step) -- pickled RunStep ----->  every rank: Worker.launch(step), then finishes
                                                     the step before it (two in flight, _run_steps)
                                                     (all-reduces / all-gathers among the ranks)
                    <-- ModelRunnerOutput ---------  rank 0 only: the step's tokens, once
                    <-- WorkerFailed --------------  any rank whose step raised; it then exits
      process sentinels: a worker that exits, for any reason, is seen at once

The driver takes no part in the collectives, so it cannot hang in one (an NCCL collective
waits forever for a dead peer): it waits on pipes and process sentinels only, and a worker
that dies or fails ends the wait with a RuntimeError that names it. The remaining workers
are then killed. Workers end when told to, when their pipe closes (the driver exited), or
when a watchdog sees that their parent is gone (a worker stuck in a collective).

Workers are forked from multiprocessing's fork server (a clean single-threaded process that
ends with the driver), with torch and transformers already imported there. They never re-run
the user's __main__ (see _main_module_hidden), so `python -`, `python -c`, notebooks and
scripts without a main guard all start them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
from tqdm import tqdm

from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture
from pagedllm.executor.worker import Worker, WorkerSpec
from pagedllm.worker.model_runner import PendingStep
from pagedllm.loader.model_loader import describe_model
from pagedllm.logger import init_logging

logger = logging.getLogger("pagedllm")

# Workers are forked from a fork server that has imported these (torch, transformers' config
# machinery: ~6 s of imports a process): a worker starts in a fraction of a second, and the
# fork server forks from a single thread, which a fork from the driver could not promise.
_PRELOAD = ["pagedllm.executor.multiproc", "transformers.models.auto.configuration_auto", "transformers.utils.type_validators"]
_STOP_TIMEOUT_S = 5.0  # a worker asked to stop gets this long before it is killed
_WATCHDOG_PERIOD_S = 1.0
_POLL_S = 50e-6  # a worker with a step in flight checks its pipe and the device this often


# -- messages between the driver and a worker (pickled over the worker's pipe) -----------------


@dataclass(frozen=True)
class WorkerReady:
    rank: int
    num_blocks: int  # KV blocks, already the minimum over ranks


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    exception: str  # its type's name
    message: str
    traceback: str


@dataclass(frozen=True)
class RunStep:
    scheduler_output: SchedulerOutput
    grammar_bitmask: Any  # numpy int32 [rows, words] or None


@dataclass(frozen=True)
class StopWorker:
    pass


@dataclass
class _WorkerHandle:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: Connection


# -- the driver ----------------------------------------------------------------------------------


class MultiprocExecutor(Executor):
    def __init__(self, args: EngineArgs, max_num_batched_tokens: int) -> None:
        self.model_info = describe_model(args)  # a model that cannot be split fails here, before any process starts
        world_size = args.tensor_parallel_size
        _check_devices(args.resolved_device, world_size)
        config = self.model_info.config
        if config.hf_config.num_attention_heads % world_size or config.num_kv_heads % world_size:
            logger.warning(
                "%d attention heads / %d KV heads do not divide by tensor_parallel_size %d: ranks hold unequal "
                "shares, and the largest sets the pace", config.hf_config.num_attention_heads, config.num_kv_heads, world_size,
            )
        # Port 0: the OS picks a free port and the store holds it; the ranks connect to it.
        self._store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)  # takes effect when this process starts its fork server
        self._workers: list[_WorkerHandle] = []
        self._error: RuntimeError | None = None
        self._first_failure: WorkerFailed | None = None
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        start = time.perf_counter()
        for rank in range(world_size):
            spec = WorkerSpec(args, rank, max_num_batched_tokens, "127.0.0.1", self._store.port)
            ours, theirs = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main, args=(spec, theirs), name=f"pagedllm-tp-worker-{rank}", daemon=True
            )
            with _main_module_hidden():
                process.start()
            theirs.close()
            self._workers.append(_WorkerHandle(rank, process, ours))
        try:
            ready = self._collect(range(world_size))
        except RuntimeError as e:
            failed = self._first_failure
            if failed is not None and failed.exception == "ValueError":  # a checkpoint that does not fit, say
                raise ValueError(failed.message) from e  # what the user can fix, as one rank would say it
            raise
        except BaseException:
            _stop_workers(self._workers, timeout=0.0)
            raise
        self.num_blocks = min(message.num_blocks for message in ready.values())
        self._pending: SchedulerOutput | None = None
        logger.info(
            "tensor parallel: %d worker processes (%s, %s) ready in %.1f s",
            world_size, "NCCL" if args.resolved_device.startswith("cuda") else "gloo",
            ", ".join(str(w.process.pid) for w in self._workers), time.perf_counter() - start,
        )

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        # Sent with the sampling call: the workers run a whole step per message, while
        # this process (the engine core) prepares the next one.
        self._pending = scheduler_output

    def sample_tokens(self, grammar_bitmask=None) -> StepFuture:
        if self._error is not None:
            raise self._error
        payload = pickle.dumps(RunStep(self._pending, grammar_bitmask), protocol=pickle.HIGHEST_PROTOCOL)
        self._pending = None
        for worker in self._workers:
            try:
                worker.conn.send_bytes(payload)
            except OSError:  # its end is closed: it died (its sentinel says how)
                self._fail()
        return _RankZeroReply(self)

    def check_health(self) -> None:
        if self._error is not None:
            raise self._error
        if any(not w.process.is_alive() for w in self._workers):
            self._fail()

    def shutdown(self) -> None:
        self._finalizer()

    # -- waiting on the workers ------------------------------------------------------------------

    def _collect(self, ranks: Iterable[int]) -> dict[int, object]:
        """The next message of each of `ranks`. A message from another rank (only failures
        are sent unasked) or a worker's exit raises RuntimeError."""
        pending = set(ranks)
        replies: dict[int, object] = {}
        conns = {w.conn: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        while pending:
            ready = multiprocessing.connection.wait([*conns, *sentinels])
            for obj in ready:  # messages first: a failing worker reports, then exits
                if obj not in conns:
                    continue
                worker = conns[obj]
                try:
                    message = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):  # closed: the worker is exiting, its sentinel follows
                    del conns[obj]
                    continue
                if isinstance(message, WorkerFailed):
                    self._fail(failed=message)
                if worker.rank not in pending:
                    self._fail(reason=f"worker rank {worker.rank} sent an unexpected {type(message).__name__}")
                replies[worker.rank] = message
                pending.discard(worker.rank)
            if any(obj in sentinels for obj in ready):
                self._fail()
        return replies

    def _fail(self, reason: str = "", failed: WorkerFailed | None = None) -> None:
        """Stop every worker and raise (now and on every later call) an error that says which
        worker went and why. A dead worker is the cause, and an error on another rank (a
        collective whose peer vanished) its consequence, so deaths come first."""
        self._reap_exited(timeout=1.0)
        lines = [
            f"tensor-parallel worker rank {w.rank} (pid {w.process.pid}) died: {_exit_reason(w.process.exitcode)}"
            for w in self._workers
            if not w.process.is_alive() and (failed is None or w.rank != failed.rank)
        ]
        if failed is not None:
            lines.append(f"tensor-parallel worker rank {failed.rank} failed:\n{failed.traceback.rstrip()}")
            self._first_failure = failed
        if reason:
            lines.append(reason)
        self._error = RuntimeError("\n".join(lines) + "\nthe engine cannot run without all its ranks: start it again")
        _stop_workers(self._workers, timeout=0.0)  # the others may be waiting in a collective: no use asking
        raise self._error

    def _reap_exited(self, timeout: float) -> None:
        """Wait up to `timeout` for a worker to exit, and reap those that did. (A sentinel fires
        when the process's files close, a moment before waitpid, and so is_alive, sees it gone.)"""
        sentinels = {w.process.sentinel: w for w in self._workers}
        for sentinel in multiprocessing.connection.wait(list(sentinels), timeout):
            sentinels[sentinel].process.join(1.0)


class _RankZeroReply:
    """The step's output, as rank 0 sends it (steps are answered in order)."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self.executor = executor

    def result(self) -> ModelRunnerOutput:
        return self.executor._collect([0])[0]


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """multiprocessing re-runs the parent's main script in every child it starts, so that
    pickled references into it resolve there. Our workers need nothing from it (their target
    and arguments live in pagedllm), and re-running it breaks: from `python -` the "script" is
    a file named '<stdin>' that does not exist, and a script without an `if __name__ ==
    "__main__":` guard would build its LLM again inside each worker. While a worker starts,
    __main__ is a bare module with no file and no spec: there is nothing to re-run."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _check_devices(device: str, world_size: int) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} needs {world_size} GPUs, {torch.cuda.device_count()} are visible: "
            "lower tensor_parallel_size or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _stop_workers(workers: list[_WorkerHandle], timeout: float = _STOP_TIMEOUT_S) -> None:
    """Ask the workers to stop, give them `timeout` seconds, kill those left; close the pipes.
    Safe to call again."""
    for w in workers:
        if w.process.is_alive() and not w.conn.closed:
            try:
                w.conn.send_bytes(pickle.dumps(StopWorker()))
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.kill()  # stuck in a collective whose peer is gone: nothing else reaches it
            w.process.join(2.0)
        w.conn.close()


# -- a worker process ----------------------------------------------------------------------------


def _worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process: start the rank, then run steps until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver decides
    _exit_with_parent()
    init_logging()
    # tqdm's default lock is a named semaphore, which a killed worker would leave behind.
    tqdm.set_lock(threading.RLock())
    try:
        worker = Worker(spec)
        conn.send_bytes(pickle.dumps(WorkerReady(spec.rank, worker.num_blocks)))
        _run_steps(worker, conn)
    except EOFError:  # the driver closed its end: it is gone
        os._exit(0)
    except Exception:
        error = traceback.format_exc()
        exception = sys.exc_info()[1]
        logger.error("tensor-parallel worker rank %d failed:\n%s", spec.rank, error)
        try:
            conn.send_bytes(pickle.dumps(WorkerFailed(spec.rank, type(exception).__name__, str(exception), error)))
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(1)  # not a clean exit: the other ranks may be inside a collective with us
    worker.shutdown()


def _run_steps(worker: Worker, conn: Connection) -> None:
    """Run steps until told to stop, two in flight like the engine core's own loop: a step that
    arrives while the previous one is still on the device is launched first (its inputs are
    prepared while the device works), then the previous one is finished and answered. A step
    that finishes with nothing queued behind it is answered at once, since the driver may be
    waiting for it before it sends the next (synchronous scheduling, grammar masks)."""
    in_flight: PendingStep | None = None
    while True:
        if in_flight is not None and not _wait_message_or_done(conn, in_flight):
            _reply(conn, worker.finish(in_flight))
            in_flight = None
            continue
        message = pickle.loads(conn.recv_bytes())
        if isinstance(message, StopWorker):
            return
        step = worker.launch(message.scheduler_output, message.grammar_bitmask)
        if in_flight is not None:
            _reply(conn, worker.finish(in_flight))
        in_flight = step


def _wait_message_or_done(conn: Connection, step: PendingStep) -> bool:
    """Whether a message arrived before `step` finished on the device."""
    while not step.done():
        if conn.poll(_POLL_S):
            return True
    return conn.poll(0)


def _reply(conn: Connection, output: ModelRunnerOutput | None) -> None:
    if output is not None:  # rank 0 answers for all
        conn.send_bytes(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))


def _exit_with_parent() -> None:
    """A watchdog thread: end this process once its parent, the driver's fork server, is gone;
    the fork server ends with the driver. (The driver's pipe closing ends an idle worker
    already; this ends one stuck in a collective.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCHDOG_PERIOD_S)
        os._exit(1)

    threading.Thread(target=watch, name="driver-watchdog", daemon=True).start()
