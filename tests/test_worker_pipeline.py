"""A tensor-parallel worker keeps two steps in flight (executor/multiproc.py, _run_steps).

On a GPU a step's tokens arrive a few milliseconds after its launch; on the CPU they are there at
once, so the engine tests never see a step still running when the next one arrives. Here a
worker's steps finish on a timer instead of a device, and the loop runs over a real pipe in a
thread: the driver's side is the same bytes the MultiprocExecutor writes and reads.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time

from pagedllm.executor.multiproc import RunStep, StopWorker, _run_steps

STEP_S = 0.2  # how long a step takes on the pretend device


class _TimedStep:
    def __init__(self, value: int) -> None:
        self.value = value
        self.ready_at = time.monotonic() + STEP_S

    def done(self) -> bool:
        return time.monotonic() >= self.ready_at

    def result(self) -> int:
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        return self.value


class _Worker:
    """Worker's launch/finish contract: launch returns at once, finish waits for the step."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def launch(self, scheduler_output, grammar_bitmask) -> _TimedStep:
        self.events.append(f"launch {scheduler_output}")
        return _TimedStep(scheduler_output)

    def finish(self, step: _TimedStep) -> int:
        output = step.result()
        self.events.append(f"finish {step.value}")
        return output


def _start():
    driver, worker_end = multiprocessing.Pipe()
    worker = _Worker()
    thread = threading.Thread(target=_run_steps, args=(worker, worker_end), daemon=True)
    thread.start()
    return driver, worker, thread


def _send(conn, message) -> None:
    conn.send_bytes(pickle.dumps(message))


def _reply(conn, timeout: float) -> int:
    assert conn.poll(timeout), f"no reply within {timeout} s"
    return pickle.loads(conn.recv_bytes())


def test_a_queued_step_is_launched_before_the_one_in_flight_is_finished():
    driver, worker, thread = _start()
    _send(driver, RunStep(1, None))
    _send(driver, RunStep(2, None))  # the async engine sends N+1 before it waits for N
    assert [_reply(driver, 5), _reply(driver, 5)] == [1, 2]  # answered in order
    _send(driver, StopWorker())
    thread.join(5)
    assert not thread.is_alive()
    assert worker.events == ["launch 1", "launch 2", "finish 1", "finish 2"]


def test_a_step_with_nothing_behind_it_is_answered_without_waiting_for_the_next():
    """A synchronous driver (penalties, grammar masks, --async-scheduling off) waits for step N
    before it sends N+1: the worker must answer N on its own, or both wait forever."""
    driver, worker, thread = _start()
    for n in (1, 2, 3):
        start = time.monotonic()
        _send(driver, RunStep(n, None))
        assert _reply(driver, 5) == n
        assert time.monotonic() - start < STEP_S + 1.0
    _send(driver, StopWorker())
    thread.join(5)
    assert worker.events == ["launch 1", "finish 1", "launch 2", "finish 2", "launch 3", "finish 3"]
