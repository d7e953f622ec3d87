"""DataParallelClient: N engine cores (replicas of the whole model) behind one server.

    server process                                 engine core processes
    ──────────────────────────────────────         ─────────────────────
    DataParallelClient.add_request                 replica 0: its own GPU(s) / CPU threads
      route: fewest outstanding tokens ──────────► replica 1
             (or the replica that holds the        ...
              prompt's prefix, if not too busy)    replica N-1
      -> that replica's AsyncEngineClient, which tokenizes, sends and streams as with one core

Each replica is an ordinary AsyncEngineClient with its own engine core process, KV cache and
scheduler; nothing is shared between them. A request stays on its replica for its whole life.
With several API server processes (entrypoints/openai/api_servers.py) each has its own
DataParallelClient connected to every core, and routes by its own view: the outstanding
tokens of the requests it sent itself (as vLLM's API servers do), not the server's total.

Routing: a request goes to the live replica with the fewest outstanding tokens (prompt plus
tokens still to generate, over its open requests); of equals, the one that got a request
longest ago, so an idle server alternates. A prompt whose first PREFIX_KEY_CHARS
characters (or PREFIX_KEY_TOKENS token ids) were last routed to replica r goes to r again,
where that prefix is likely cached, unless r has more than PREFIX_AFFINITY_SLACK_TOKENS
outstanding tokens over the least busy replica.

A replica that dies fails its own requests at once (EngineDeadError: 503, or an error event in
a stream), and /health answers 503 naming it; the other replicas keep taking requests. The
server does not restart a replica: restart the server (which /health's 503 tells an
orchestrator to do).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.engine.async_client import AsyncEngineClient, EngineDeadError, EngineStartError, RequestStream
from pagedllm.engine.core_handle import EngineCoreAddress
from pagedllm.engine.input_processor import Prompt
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

PREFIX_KEY_CHARS = 512  # a text prompt at least this long is routed by its first this-many characters
PREFIX_KEY_TOKENS = 128  # likewise for a token-id prompt
PREFIX_AFFINITY_SLACK_TOKENS = 4096  # extra load a replica may carry and still get its prefix's requests
_MAX_PREFIX_KEYS = 16384  # most prefixes remembered (least recently routed forgotten first)


class DataParallelClient:
    def __init__(self, replicas: list[AsyncEngineClient], front_end: int = 0) -> None:
        self.replicas = replicas
        self.info = min((r.info for r in replicas), key=lambda info: info.max_model_len)  # what every replica takes
        self.tokenizer = replicas[0].tokenizer
        self._prefix_owner: OrderedDict[tuple, int] = OrderedDict()
        # When each replica last got a request (a count): ties go to the oldest. Front end k
        # starts at replica k, so that several API servers do not all start on replica 0.
        self._last_routed = [(i - front_end) % len(replicas) - len(replicas) for i in range(len(replicas))]
        self._num_routed = 0

    @classmethod
    async def start(cls, args: EngineArgs, size: int) -> DataParallelClient:
        """Start `size` engine cores at once, each on its own devices; all or none."""
        try:
            envs = await asyncio.to_thread(replica_envs_for, args, size)
        except ValueError as e:
            raise EngineStartError(str(e)) from e
        client = await cls._gather([AsyncEngineClient.start(args, env=env) for env in envs])
        for index, replica in enumerate(client.replicas):
            logger.info("data-parallel replica %d: engine core pid %d (%s)", index, replica.process.pid, describe_env(envs[index]))
        return client

    @classmethod
    async def connect(cls, addresses: list[EngineCoreAddress], front_end: int) -> DataParallelClient:
        """Reach engine cores that another process started, as front end `front_end`; all or none."""
        return await cls._gather([AsyncEngineClient.connect(address, front_end) for address in addresses])

    @classmethod
    async def _gather(cls, clients: list[Coroutine[Any, Any, AsyncEngineClient]]) -> DataParallelClient:
        started = await asyncio.gather(*clients, return_exceptions=True)
        failed = [(i, r) for i, r in enumerate(started) if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(r.shutdown() for r in started if isinstance(r, AsyncEngineClient)))
            index, error = failed[0]
            if isinstance(error, EngineStartError):
                raise EngineStartError(f"data-parallel replica {index}: {error}") from error
            raise error
        return cls(started, started[0].front_end)

    # -- health ----------------------------------------------------------------------------------

    def _dead(self) -> list[tuple[int, EngineDeadError]]:
        return [(i, r.dead_error) for i, r in enumerate(self.replicas) if r.dead_error is not None]

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Set once no replica is left to serve."""
        dead = self._dead()
        if len(dead) < len(self.replicas):
            return None
        return EngineDeadError("every data-parallel replica is dead: " + "; ".join(f"replica {i}: {e}" for i, e in dead))

    @property
    def health_error(self) -> EngineDeadError | None:
        """Set once any replica is dead (the others may still serve)."""
        dead = self._dead()
        if not dead:
            return None
        live = [str(i) for i in range(len(self.replicas)) if i not in dict(dead)]
        described = "; ".join(f"data-parallel replica {i} of {len(self.replicas)} is dead ({e})" for i, e in dead)
        return EngineDeadError(f"{described}; still serving: {', '.join(f'replica {i}' for i in live) or 'none'}")

    def observe(self, metrics) -> None:
        """Report each replica to a server's metrics under its own `engine` label."""
        for index, replica in enumerate(self.replicas):
            replica.stats_observer = metrics.engine(index)
            if replica.dead_error is not None:
                replica.stats_observer.record_dead()

    @property
    def num_open_requests(self) -> int:
        return sum(r.num_open_requests for r in self.replicas)

    def abort_all(self) -> None:
        """End every open request of every replica now (a server shutting down)."""
        for replica in self.replicas:
            replica.abort_all()

    async def shutdown(self, timeout: float = 2.0) -> None:
        await asyncio.gather(*(r.shutdown(timeout) for r in self.replicas))

    # -- requests --------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> RequestStream:
        """Add to the replica `route` picks; a replica found dead on the way is skipped."""
        key = _prefix_key(prompt)
        while True:
            index = self.route(key)
            try:
                stream = self.replicas[index].add_request(request_id, prompt, params, arrival_time)
            except EngineDeadError:
                if self.dead_error is not None:
                    raise self.dead_error from None
                continue  # it died since route() looked: another one
            self._num_routed += 1
            self._last_routed[index] = self._num_routed
            if key is not None:
                self._prefix_owner[key] = index
                self._prefix_owner.move_to_end(key)
                if len(self._prefix_owner) > _MAX_PREFIX_KEYS:
                    self._prefix_owner.popitem(last=False)
            return stream

    def route(self, key: tuple | None) -> int:
        """The replica for a request whose prompt has prefix key `key`."""
        live = [i for i, r in enumerate(self.replicas) if r.dead_error is None]
        if not live:
            raise self.dead_error
        least = min(live, key=lambda i: (self.replicas[i].num_outstanding_tokens, self._last_routed[i]))
        owner = self._prefix_owner.get(key) if key is not None else None
        if owner in live:
            extra = self.replicas[owner].num_outstanding_tokens - self.replicas[least].num_outstanding_tokens
            if extra <= PREFIX_AFFINITY_SLACK_TOKENS:
                return owner
        return least


def _prefix_key(prompt: Prompt) -> tuple | None:
    """What identifies a long prompt's shared prefix (a system prompt, a document), cheaply:
    no tokenization here (the replica tokenizes)."""
    if isinstance(prompt, str):
        return ("text", prompt[:PREFIX_KEY_CHARS]) if len(prompt) >= PREFIX_KEY_CHARS else None
    return ("ids", tuple(prompt[:PREFIX_KEY_TOKENS])) if len(prompt) >= PREFIX_KEY_TOKENS else None


def replica_envs_for(args: EngineArgs, size: int) -> list[dict[str, str]]:
    """replica_envs, computed in a short-lived process (finding the device and counting GPUs
    loads torch, which the server process must not); one replica keeps the whole machine."""
    if size == 1:
        return [{}]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(replica_envs, args, size).result()


def replica_envs(args: EngineArgs, size: int) -> list[dict[str, str]]:
    """Each replica's devices: on CUDA its own tensor_parallel_size GPUs, in order of the visible
    ones (CUDA_VISIBLE_DEVICES); on the CPU an equal share of the cores (OpenMP threads)."""
    if size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {size}")
    device = args.resolved_device
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"with data_parallel_size > 1 use --device cuda, not {device}: replicas take the visible GPUs in order")
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
        per_replica = args.tensor_parallel_size
        if len(gpus) < size * per_replica:
            raise ValueError(
                f"data_parallel_size {size} x tensor_parallel_size {per_replica} needs {size * per_replica} GPUs, "
                f"{len(gpus)} are visible: lower one of them or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per_replica:(i + 1) * per_replica])} for i in range(size)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [{"OMP_NUM_THREADS": str(max(1, cores // size))} for _ in range(size)]


def describe_env(env: dict[str, str]) -> str:
    if not env:
        return "every device"
    if "CUDA_VISIBLE_DEVICES" in env:
        return f"GPUs {env['CUDA_VISIBLE_DEVICES']}"
    return f"CPU, {env['OMP_NUM_THREADS']} threads"
