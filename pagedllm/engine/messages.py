"""The typed messages between the server process (front end) and the engine core process.

    front ends ──AddRequests / AbortRequests / Shutdown──► core      (zmq PUSH -> PULL)
    front end k ◄──EngineReady / CoreOutputs / RequestFailed / EngineDead── core

The sockets live on ipc:// paths in a private temporary folder (engine/core_handle.py) and
carry pickled dataclasses: the peers are processes of one program on one machine. With
several front ends (API server processes), the core sends each request's outputs to the
front end that added it, and its stats to every front end with every step.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import CacheConfig
from pagedllm.core.interface import EngineCoreOutput
from pagedllm.sampling_params import SamplingParams

# -- what the core says about itself --------------------------------------------------------


@dataclass(frozen=True)
class EngineInfo:
    """What a front end needs to know about a running core (it may live in another process)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    cache: CacheConfig


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; the prefix-cache and preemption figures are running totals."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int



# -- front end -> core ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCoreRequest:
    """A request as the front end hands it over: tokenized, params resolved (n > 1 already
    fanned out into children). The core builds its own scheduler state from it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class AddRequests:
    requests: list[EngineCoreRequest]
    front_end: int = 0  # where the core sends these requests' outputs


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]  # core request ids; unknown ids are ignored


@dataclass(frozen=True)
class Shutdown:
    pass


ToCore = AddRequests | AbortRequests | Shutdown


# -- core -> front end ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineReady:
    """Sent once the model is loaded and the KV cache allocated."""

    info: EngineInfo
    tokenizer: Any  # the engine's own tokenizer (chat template override applied), pickled
    pid: int


@dataclass(frozen=True)
class CoreOutputs:
    """What one step produced, with the engine's state after it (also sent, with no outputs,
    after aborts so that metrics see freed blocks at once)."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    first_scheduled: dict[str, float] = field(default_factory=dict)  # core request id -> time.monotonic()


@dataclass(frozen=True)
class RequestFailed:
    """The core refused a request (the front end checks first, so this is rare)."""

    request_id: str  # core request id
    message: str


@dataclass(frozen=True)
class EngineDead:
    """The core hit an error it cannot recover from; the process exits after sending this."""

    message: str


FromCore = EngineReady | CoreOutputs | RequestFailed | EngineDead


def encode(message: ToCore | FromCore) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> ToCore | FromCore:
    return pickle.loads(data)
