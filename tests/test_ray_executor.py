"""The Ray executor on CPU: a local Ray instance started here, one actor per rank over gloo.

Two ranks as Ray actors give the tokens and logprobs of one rank;
an actor killed mid-generation fails the engine within seconds with an error naming its rank
and node, and leaves no actor process and no placement group behind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from model_utils import one_thread, tokenizer_dir  # noqa: F401 (fixtures)
from server_utils import pid_alive
from test_models import ENGINE, checkpoints, vocab  # noqa: F401 (fixtures)
from test_tensor_parallel import ARGMAX, GREEDY, PROMPTS, SEEDED, compare, run

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_llm(checkpoints):
    """A local Ray instance (10-30 s to start on a busy 2-core machine) and an engine of two
    Ray actors on it, for the module: the tests that follow run it, then kill one of its actors.
    Ray's CPUs are logical: two, one per rank's placement bundle (Ray starts a worker process
    per CPU ahead of time, which the actors then take)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report home from CI
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    llm = LLM(checkpoints("llama"), tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    yield llm
    llm.engine.core.shutdown()
    ray.shutdown()


def actor_pids(llm: LLM) -> list[int]:
    return [place.pid for place in llm.engine.core.executor._places]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive after up to `timeout` s (Ray reaps a killed actor asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_two_ray_actors_match_one_rank(ray_llm, checkpoints):
    pids = actor_pids(ray_llm)
    assert len(set(pids)) == 2 and os.getpid() not in pids  # one process per rank, none of them this one
    split = [ray_llm.generate(PROMPTS, p, use_tqdm=False) for p in (GREEDY, SEEDED, ARGMAX)]
    compare(run(checkpoints("llama"), 1), split)


def test_killed_actor_fails_the_engine_within_seconds_and_leaves_nothing(ray_llm):
    engine = ray_llm.engine
    pids = actor_pids(ray_llm)
    engine.add_request("long", "Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    node = ray.util.get_node_ip_address()
    with pytest.raises(RuntimeError, match=rf"worker rank 1 \(Ray actor, pid {pids[1]} on node {node}\) died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 15
    assert not wait_gone(pids)  # rank 0, stuck in a collective with the dead rank, was killed too
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    with pytest.raises(RuntimeError, match="rank 1 .* died"):  # and the engine stays failed
        engine.core.check_health()
