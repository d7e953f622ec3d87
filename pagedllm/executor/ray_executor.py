"""RayExecutor: one Ray actor per tensor-parallel rank, on this machine or across a Ray cluster.

    engine core (driver, holds no rank)          Ray actors in one placement group, ranks 0 .. N-1
      sample_tokens: ray.put(step) once ------>  every actor: Worker.execute(step, grammar bitmask)
      future.result(): ray.wait on every  <----  rank 0: the step's ModelRunnerOutput; others None
        rank's reply                             a dead actor: its reply is a RayActorError

Each actor wraps the same `Worker` as a process of MultiprocExecutor does, and the ranks meet
through a TCPStore the driver hosts on its node's address. The failure rules are those of
MultiprocExecutor: the driver takes part in no collective and waits on every rank's reply
of a step, so a rank that dies (its reply turns into RayActorError at once) or fails (its
traceback comes back) ends the step with a RuntimeError that names the rank, its pid and
node; the other actors, which may be stuck in a collective with it, are killed. Shutdown
kills the actors and removes the placement group; the driver exiting, even killed, takes its
actors with it (Ray ends the actors of an owner that is gone).

Ray is an optional dependency (`pip install 'pagedllm[ray]'`): it is imported here only.
`ray.init()` joins the cluster this machine belongs to (`ray start`, or RAY_ADDRESS), else
starts a local instance that ends with this process; a driver that already called
`ray.init` (a test, a notebook) keeps its own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.abstract import Executor, StepFuture
from pagedllm.executor.worker import Worker, WorkerSpec
from pagedllm.loader.model_loader import describe_model

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # the error is raised when the backend is chosen, with what to install
    ray = None

logger = logging.getLogger("pagedllm")

PLACEMENT_TIMEOUT_S = 120.0  # how long to wait for the cluster to offer the ranks' resources
_HEALTH_TIMEOUT_S = 10.0  # an idle actor answers a ping within this (a busy host may be slow)
_STOP_TIMEOUT_S = 5.0  # actors asked to stop get this long before they are killed
_DEATH_GRACE_S = 2.0  # after one rank's failure, how long the others get to report theirs


@dataclass(frozen=True)
class ActorPlace:
    """Where a rank's actor runs, for error messages."""

    pid: int
    node_ip: str


class RankActor:
    """The body of a rank's Ray actor: a Worker, started on request (so that every rank can
    join the process group at once) and driven step by step."""

    def __init__(self) -> None:
        from pagedllm.logger import init_logging

        init_logging()
        self.worker: Worker | None = None

    def place(self) -> ActorPlace:
        return ActorPlace(os.getpid(), ray.util.get_node_ip_address())

    def start(self, spec: WorkerSpec) -> int:
        self.worker = Worker(spec)
        return self.worker.num_blocks

    def execute(self, scheduler_output: SchedulerOutput, grammar_bitmask) -> ModelRunnerOutput | None:
        assert self.worker is not None, "start() first"
        return self.worker.execute(scheduler_output, grammar_bitmask)

    def ping(self) -> None:
        pass

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class RayExecutor(Executor):
    def __init__(self, args: EngineArgs, max_num_batched_tokens: int) -> None:
        if ray is None:
            raise ValueError(
                "distributed_executor_backend 'ray' needs Ray, which is not installed: pip install 'pagedllm[ray]' "
                "(or use the default backend, mp, on one machine)"
            )
        self.model_info = describe_model(args)  # a model that cannot be split fails here, before any actor starts
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init()  # this machine's cluster if it has one, else a local instance
        world_size = args.tensor_parallel_size
        on_gpu = args.resolved_device.startswith("cuda")
        self._actors: list[Any] = []
        self._places: list[ActorPlace | None] = [None] * world_size
        self._error: RuntimeError | None = None
        self._pending: SchedulerOutput | None = None
        self._placement = placement_group([{"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}] * world_size, strategy="PACK")
        try:
            self._start(args, max_num_batched_tokens, world_size, on_gpu)
        except BaseException:
            self._stop(timeout=0.0)
            raise

    def _start(self, args: EngineArgs, max_num_batched_tokens: int, world_size: int, on_gpu: bool) -> None:
        start = time.perf_counter()
        ready, _ = ray.wait([self._placement.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            need = f"{world_size} GPUs" if on_gpu else f"{world_size} CPUs"
            raise ValueError(
                f"the Ray cluster did not offer {need} (one per rank) within {PLACEMENT_TIMEOUT_S:.0f} s; it has "
                f"{ray.available_resources()} available: add nodes, or lower tensor_parallel_size"
            )
        actor_class = ray.remote(num_cpus=0 if on_gpu else 1, num_gpus=1 if on_gpu else 0)(RankActor)
        for rank in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=rank)
            self._actors.append(actor_class.options(scheduling_strategy=strategy, name=None).remote())
        self._places = list(self._gather([a.place.remote() for a in self._actors]))
        # Ranks meet at a store on the driver's address, reachable from every node of the cluster.
        self._store = dist.TCPStore(ray.util.get_node_ip_address(), 0, None, is_master=True, wait_for_workers=False)
        device_index = 0 if on_gpu else None  # Ray makes each actor's GPU its only visible one
        specs = [
            WorkerSpec(args, rank, max_num_batched_tokens, ray.util.get_node_ip_address(), self._store.port, device_index)
            for rank in range(world_size)
        ]
        try:
            num_blocks = self._gather([actor.start.remote(spec) for actor, spec in zip(self._actors, specs)])
        except RuntimeError as e:
            if isinstance(e.__cause__, ValueError):  # a checkpoint that does not fit, say: as one rank would say it
                raise ValueError(str(e.__cause__)) from e
            raise
        self.num_blocks = min(num_blocks)
        nodes = sorted({p.node_ip for p in self._places if p is not None})
        logger.info(
            "tensor parallel: %d Ray actors (pids %s on %s, %s) ready in %.1f s", world_size,
            ", ".join(str(p.pid) for p in self._places if p is not None), ", ".join(nodes),
            "NCCL" if on_gpu else "gloo", time.perf_counter() - start,
        )

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        # Sent with the sampling call: an actor runs a whole step per call, while this process
        # (the engine core) prepares the next one.
        self._pending = scheduler_output

    def sample_tokens(self, grammar_bitmask=None) -> StepFuture:
        step, self._pending = self._pending, None
        return _StepReplies(self, self._launch(step, grammar_bitmask))

    def _launch(self, scheduler_output: SchedulerOutput, grammar_bitmask) -> list[Any]:
        """Send one step to every rank (every rank runs it: the collectives need all of them);
        an actor runs its calls in the order sent, so steps may be launched before the last
        one's tokens are read."""
        if self._error is not None:
            raise self._error
        step = ray.put(scheduler_output)  # serialized once, whatever the number of ranks
        return [actor.execute.remote(step, grammar_bitmask) for actor in self._actors]

    def check_health(self) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._gather([actor.ping.remote() for actor in self._actors], timeout=_HEALTH_TIMEOUT_S)
        except GetTimeoutError:
            pass  # alive but slow to answer (a busy host): not a failure

    def shutdown(self) -> None:
        self._stop(timeout=_STOP_TIMEOUT_S)

    # -- waiting on the ranks --------------------------------------------------------------------

    def _gather(self, refs: list[Any], timeout: float | None = None) -> list[Any]:
        """Every rank's reply to one call, in rank order. Replies are taken as they come, so a
        rank that died or raised is seen at once even while the others wait for it in a
        collective; that raises RuntimeError (now and on every later call)."""
        if self._error is not None:
            raise self._error
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        replies: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise GetTimeoutError(f"ranks {sorted(rank_of[r] for r in pending)} did not answer in {timeout} s")
            for ref in done:
                try:
                    replies[rank_of[ref]] = ray.get(ref)
                except (RayActorError, RayTaskError):
                    self._fail([ref, *pending], rank_of)
        return replies

    def _fail(self, refs: list[Any], rank_of: dict[Any, int]) -> None:
        """Kill every actor (the others may be stuck in a collective with the one that went)
        and raise, now and on every later call, an error that says which rank went and why.
        A dead rank is the cause, and an error on another (a collective whose peer vanished)
        its consequence; Ray may report them in either order, so the others get
        _DEATH_GRACE_S to report, and deaths come first."""
        ray.wait(refs, num_returns=len(refs), timeout=_DEATH_GRACE_S)
        deaths, failures, cause = [], [], None
        for ref in refs:
            rank = rank_of[ref]
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                deaths.append(f"tensor-parallel worker rank {rank} ({self._where(rank)}) died: {_death_reason(e)}")
            except RayTaskError as e:
                failures.append(f"tensor-parallel worker rank {rank} ({self._where(rank)}) failed:\n{e}")
                cause = cause or e.cause
            except GetTimeoutError:
                pass  # still waiting, most likely in a collective: killed below
        self._error = RuntimeError("\n".join(deaths + failures) + "\nthe engine cannot run without all its ranks: start it again")
        self._error.__cause__ = cause
        self._stop(timeout=0.0)
        raise self._error

    def _where(self, rank: int) -> str:
        place = self._places[rank]
        return f"Ray actor, pid {place.pid} on node {place.node_ip}" if place is not None else "Ray actor, not yet placed"

    def _stop(self, timeout: float) -> None:
        """Ask the actors to stop (given `timeout` s), kill them, free the placement group, and
        end the Ray instance if this executor started it. Safe to call again."""
        actors, self._actors = self._actors, []
        if timeout > 0 and actors:
            ray.wait([a.stop.remote() for a in actors], num_returns=len(actors), timeout=timeout)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if getattr(self, "_placement", None) is not None:
            remove_placement_group(self._placement)
            self._placement = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __del__(self) -> None:  # the LLM object garbage-collected: take the actors with it
        try:
            if ray is not None and ray.is_initialized():
                self._stop(timeout=0.0)
        except Exception:
            pass


class _StepReplies:
    """A launched step: its result is rank 0's reply, once every rank has answered."""

    def __init__(self, executor: RayExecutor, refs: list[Any]) -> None:
        self.executor = executor
        self.refs = refs

    def result(self) -> ModelRunnerOutput:
        return self.executor._gather(self.refs)[0]


def _death_reason(error: BaseException) -> str:
    """Ray's account of an actor's death, first line (it explains at length)."""
    text = str(error).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("The actor died"):
            return line
    return text.splitlines()[0] if text else type(error).__name__

