"""Data parallelism: `pagedllm serve --data-parallel-size 2`, a real server with two engine
core processes, on a tiny Llama checkpoint.

Both replicas serve (each request's text is the offline engine's, /metrics shows work on
each); when one replica is killed its request fails at once with a 503, /health answers 503
naming it, and the other replica goes on serving.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest
from model_utils import one_thread, tokenizer_dir  # noqa: F401 (fixtures)
from server_utils import RemoteServer, pid_alive
from test_models import ENGINE, PROMPTS, checkpoints, vocab  # noqa: F401 (fixtures)

from pagedllm import LLM, SamplingParams

MAX_TOKENS = 8
SERVER_ARGS = [
    "--dtype", ENGINE["dtype"], "--kv-cache-memory", ENGINE["kv_cache_memory"],
    "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
]


@pytest.fixture(scope="module")
def server(checkpoints):
    server = RemoteServer([checkpoints("llama"), *SERVER_ARGS, "--data-parallel-size", "2"])
    yield server
    server.close()


def replica_pids(server: RemoteServer) -> dict[int, int]:
    """Replica index -> its engine core's pid, from the server's start-up log."""
    found = re.findall(r"data-parallel replica (\d+): engine core pid (\d+)", server.read_log())
    return {int(index): int(pid) for index, pid in found}


def per_engine(server: RemoteServer, name: str) -> dict[str, float]:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    found = re.findall(rf'^pagedllm:{name}{{engine="(\d+)",[^}}]*}} (\S+)$', text, re.MULTILINE)
    return {engine: float(value) for engine, value in found}


def complete(server: RemoteServer, prompt: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(server.url("/v1/completions"), json=body, timeout=120)


def test_both_replicas_serve_the_offline_engines_text(server, checkpoints, one_thread):
    assert sorted(replica_pids(server)) == [0, 1]
    # One at a time, so each runs alone on its replica as each runs alone here: the same sums,
    # the same text. (An idle server alternates replicas.)
    llm = LLM(checkpoints("llama"), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        response = complete(server, prompt)
        assert response.status_code == 200, response.text
        (expected,) = llm.generate(prompt, params, use_tqdm=False)
        assert response.json()["choices"][0]["text"] == expected.outputs[0].text
    generated = per_engine(server, "generation_tokens_total")
    assert generated["0"] >= MAX_TOKENS and generated["1"] >= MAX_TOKENS, generated
    # And at once: every request answered in full.
    responses: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda p=p: responses.append(complete(server, p))) for p in PROMPTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in responses] == [200] * len(threads)
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in responses)


def test_a_dead_replica_fails_its_requests_fast_and_health_while_the_other_serves(server):
    pids = replica_pids(server)
    # Freeze both engines, so that two requests wait on one replica each (the second goes to
    # the replica without outstanding tokens), then kill replica 1 and thaw replica 0.
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    results: dict[int, tuple[httpx.Response, float]] = {}

    def send(i: int) -> None:
        response = complete(server, PROMPTS[i])
        results[i] = (response, time.monotonic())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
            time.sleep(1.0)  # the first is routed before the second arrives
        killed_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    for t in threads:
        t.join(60)
    statuses = sorted(response.status_code for response, _ in results.values())
    assert statuses == [200, 503], [r.text for r, _ in results.values()]
    failed, failed_at = next((r, at) for r, at in results.values() if r.status_code == 503)
    assert failed.json()["error"]["code"] == "engine_dead"
    assert failed_at - killed_at < 10  # failed at once, not after a timeout
    health = httpx.get(server.url("/health"), timeout=10)
    assert health.status_code == 503
    message = health.json()["error"]["message"]
    assert "data-parallel replica 1 of 2 is dead" in message and "still serving: replica 0" in message, message
    for prompt in PROMPTS:  # the other replica takes every new request
        response = complete(server, prompt)
        assert response.status_code == 200, response.text
    assert per_engine(server, "engine_alive") == {"0": 1.0, "1": 0.0}
    assert not pid_alive(pids[1]) and pid_alive(pids[0])
