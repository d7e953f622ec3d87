"""The data-parallel router's policy, without processes: which replica a request goes to given
each replica's outstanding tokens, the prefix it last took, and which replicas are dead.
(tests/test_data_parallel.py runs the real thing: a server with two engine cores.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pagedllm.engine.async_client import EngineDeadError
from pagedllm.engine.dp_client import PREFIX_AFFINITY_SLACK_TOKENS, PREFIX_KEY_CHARS, DataParallelClient
from pagedllm.sampling_params import SamplingParams


@dataclass
class Replica:
    """What the router reads of an AsyncEngineClient, and a record of what it was given."""

    num_outstanding_tokens: int = 0
    dead_error: EngineDeadError | None = None
    info: object = None
    tokenizer: object = None
    requests: list[str] = field(default_factory=list)

    def add_request(self, request_id, prompt, params, arrival_time=None):
        if self.dead_error is not None:
            raise self.dead_error
        self.requests.append(request_id)
        self.num_outstanding_tokens += params.max_tokens
        return request_id


@dataclass
class Info:
    max_model_len: int = 2048


def router(n: int) -> tuple[DataParallelClient, list[Replica]]:
    replicas = [Replica(info=Info()) for _ in range(n)]
    return DataParallelClient(replicas), replicas  # type: ignore[arg-type]


def add(client: DataParallelClient, request_id: str, prompt="Hi", max_tokens: int = 10) -> None:
    client.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def test_fewest_outstanding_tokens_and_ties_alternate():
    client, replicas = router(3)
    for i in range(3):
        add(client, f"r{i}")
    assert [r.requests for r in replicas] == [["r0"], ["r1"], ["r2"]]
    replicas[1].num_outstanding_tokens = 0  # replica 1 finished its request
    add(client, "next")
    assert replicas[1].requests[-1] == "next"
    for r in replicas:
        r.num_outstanding_tokens = 0  # idle again: the one that waited longest goes first
    add(client, "idle")
    assert replicas[0].requests[-1] == "idle"


def test_a_long_prompt_goes_back_to_its_prefix_unless_that_replica_is_too_busy():
    client, replicas = router(2)
    system = "You are a helpful assistant. " * (PREFIX_KEY_CHARS // 10)
    add(client, "a", system + "question 1", max_tokens=100)  # replica 0 (tie, longest idle)
    add(client, "b", system + "question 2", max_tokens=100)  # busier, but holds the prefix
    assert replicas[0].requests == ["a", "b"] and replicas[1].requests == []
    replicas[0].num_outstanding_tokens = PREFIX_AFFINITY_SLACK_TOKENS + 1  # now too busy
    add(client, "c", system + "question 3")
    assert replicas[1].requests == ["c"]
    add(client, "d", system + "question 4")  # the prefix's latest replica is 1 now
    assert replicas[1].requests == ["c", "d"]
    add(client, "short", "Hi")  # short prompts have no prefix key: least busy
    assert replicas[1].requests[-1] == "short"


def test_dead_replicas_are_skipped_and_named_and_all_dead_refuses():
    client, replicas = router(2)
    replicas[0].dead_error = EngineDeadError("the engine core process (pid 1) exited with code -9")
    for i in range(3):
        add(client, f"r{i}")
    assert replicas[1].requests == ["r0", "r1", "r2"]
    assert client.dead_error is None  # the server still serves
    assert "data-parallel replica 0 of 2 is dead (the engine core process (pid 1)" in str(client.health_error)
    assert "still serving: replica 1" in str(client.health_error)
    replicas[1].dead_error = EngineDeadError("gone")
    with pytest.raises(EngineDeadError, match="every data-parallel replica is dead"):
        add(client, "late")
