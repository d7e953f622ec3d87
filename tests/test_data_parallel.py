"""Data parallelism: `pagedllm serve --data-parallel-size 2`, a real server with two engine
core processes and (the default with two replicas) two API server processes on one port, on a
tiny Llama checkpoint.

Both replicas serve (each request's text is the offline engine's, /metrics shows work on
each); both API servers answer, streamed and plain requests at once get the offline engine's
text, /metrics on either counts every request, and a client that leaves frees its blocks.
When one replica is killed its request fails at once with a 503, /health answers 503 naming
it on both API servers, and the other replica goes on serving. When an API server process
dies, the whole server stops with an error and leaves no process behind. A keep-alive
connection outlives the idle expiry of httpx and the openai SDK (the DP ReadError).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest
from model_utils import one_thread, tokenizer_dir  # noqa: F401 (fixtures)
from server_utils import RemoteServer, child_pids, pid_alive, port_is_free
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


def from_each_api_server(server: RemoteServer, path: str) -> dict[str, httpx.Response]:
    """GET `path` on new connections until both API servers have answered (the kernel hands
    each connection to one of them)."""
    answers: dict[str, httpx.Response] = {}
    for _ in range(200):
        response = httpx.get(server.url(path), timeout=10)
        answers.setdefault(response.headers["x-pagedllm-api-server"], response)
        if len(answers) == 2:
            return answers
    raise AssertionError(f"only API server {sorted(answers)} answered {path}")


def num_finished(metrics_text: str) -> float:
    return sum(float(v) for v in re.findall(r"^pagedllm:request_success_total{[^}]*} (\S+)$", metrics_text, re.MULTILINE))


def test_two_api_servers_answer_streamed_and_plain_requests_at_once(server, checkpoints, one_thread):
    assert sorted(server.api_server_pids()) == [0, 1]
    llm = LLM(checkpoints("llama"), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = {prompt: output.outputs[0].text for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False))}
    model = httpx.get(server.url("/v1/models"), timeout=10).json()["data"][0]["id"]
    before = num_finished(httpx.get(server.url("/metrics"), timeout=10).text)
    texts: dict[tuple[str, str], str] = {}

    def send(prompt: str, stream: bool) -> None:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none", max_retries=0, timeout=120)  # its own connection
        request = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            chunks = client.completions.create(**request, stream=True)
            texts[prompt, "stream"] = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            texts[prompt, "plain"] = client.completions.create(**request).choices[0].text

    threads = [threading.Thread(target=send, args=(p, stream)) for p in PROMPTS for stream in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == {(p, kind): expected[p] for p in PROMPTS for kind in ("stream", "plain")}
    # Each API server's /metrics reports every request, whichever API server took it.
    for index, response in from_each_api_server(server, "/metrics").items():
        assert num_finished(response.text) == before + len(threads), index


def test_a_client_that_leaves_frees_its_blocks(server):
    async def leave_after_first_chunk(i: int) -> None:
        body = {"prompt": f"Story number {i}:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:  # a connection each
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        return

    async def leave_all() -> None:
        await asyncio.gather(*(leave_after_first_chunk(i) for i in range(8)))

    asyncio.run(leave_all())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        usage, running = per_engine(server, "kv_cache_usage_perc"), per_engine(server, "num_requests_running")
        if usage == {"0": 0, "1": 0} and running == {"0": 0, "1": 0}:
            break
        time.sleep(0.2)
    assert (usage, running) == ({"0": 0, "1": 0}, {"0": 0, "1": 0})


def test_a_keep_alive_connection_outlives_the_clients_idle_expiry(server):
    """httpx (and the openai SDK on it) reuses a connection idle for less than keepalive_expiry
    (5 s) by its own clock, which starts once it has read the response: a loaded client reads
    it late. A server that closed connections idle for 5 s by its clock closed some just as a
    request went out on them, and that request failed with a connection reset (httpx ReadError,
    about 1 in 1,024 under `bench serve` at DP=2). Here the client reads the stream's end a
    second late, then stays within httpx's expiry."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

    def stream_to_the_end() -> None:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        events = response.read().decode().split("\n\n")
        assert response.status == 200 and not response.will_close and events[-2:] == ["data: [DONE]", ""], events

    try:
        stream_to_the_end()
        time.sleep(1.0 + httpx.Limits().keepalive_expiry - 0.1)  # the late read, then just within the expiry
        stream_to_the_end()  # on the same connection (http.client opens no other while it has one)
    finally:
        connection.close()


def test_a_dead_replica_fails_its_requests_fast_and_health_while_the_other_serves(server):
    pids = replica_pids(server)
    # Freeze both engines and send four requests: each API server routes by its own requests,
    # and one of the two gets at least two of them, which it puts on different replicas (the
    # second goes to the replica without outstanding tokens). Then kill replica 1, thaw replica 0.
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    results: dict[int, tuple[httpx.Response, float]] = {}

    def send(i: int) -> None:
        response = complete(server, PROMPTS[i])
        results[i] = (response, time.monotonic())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.5)  # each is routed before the next arrives
        killed_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    for t in threads:
        t.join(60)
    statuses = {response.status_code for response, _ in results.values()}
    assert len(results) == 4 and statuses == {200, 503}, [r.text for r, _ in results.values()]
    for failed, failed_at in ((r, at) for r, at in results.values() if r.status_code == 503):
        assert failed.json()["error"]["code"] == "engine_dead"
        assert failed_at - killed_at < 10  # failed at once, not after a timeout
    for health in from_each_api_server(server, "/health").values():
        assert health.status_code == 503
        message = health.json()["error"]["message"]
        assert "data-parallel replica 1 of 2 is dead" in message and "still serving: replica 0" in message, message
    for prompt in PROMPTS:  # the other replica takes every new request
        response = complete(server, prompt)
        assert response.status_code == 200, response.text
    assert per_engine(server, "engine_alive") == {"0": 1.0, "1": 0.0}
    assert not pid_alive(pids[1]) and pid_alive(pids[0])


def test_a_dead_api_server_stops_the_whole_server(server):
    processes = [*server.api_server_pids().values(), *child_pids(server.process.pid)]
    os.kill(server.api_server_pids()[1], signal.SIGKILL)
    assert server.process.wait(30) == 1
    time.sleep(0.5)
    assert not [pid for pid in processes if pid_alive(pid)]
    assert port_is_free(server.port)
    assert re.search(r"API server 1 \(pid \d+\) exited with code -9: stopping the server", server.read_log())
