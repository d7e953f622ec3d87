"""A server started with --api-key (given by environment, as PAGEDLLM_API_KEY): 401s,
open health; then its engine process is killed: requests in flight get an error,
/health says 503, nothing hangs, and SIGTERM still ends the server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer, pid_alive, port_is_free

MODEL = "mine"
KEY = "secret-key"


@pytest.fixture(scope="module")
def server():
    server = RemoteServer([*DEFAULT_ARGS, "--served-model-name", MODEL], env={"PAGEDLLM_API_KEY": KEY})
    yield server
    server.close()


def _complete(server, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                      headers=headers, timeout=60)


def test_api_key_is_required_on_the_api(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = _complete(server, headers)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert httpx.get(server.url("/v1/models")).status_code == 401
    assert httpx.post(server.url("/tokenize"), json={"prompt": "x"}).status_code == 401
    assert _complete(server, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(server.url(path)).status_code == 200, path


def test_openai_client_with_the_key_and_served_name(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()


def test_engine_death_fails_requests_in_flight_and_health(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    engine = server.engine_pid()
    first_chunk = threading.Event()
    outcome: dict[str, object] = {}

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    first_chunk.set()
            outcome["lines"] = lines
        except httpx.HTTPError as e:
            outcome["exception"] = e

    def waiting() -> None:  # a non-streaming request in flight
        outcome["plain"] = httpx.post(server.url("/v1/completions"), headers=headers, timeout=60,
                                      json={"model": MODEL, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True})

    threads = [threading.Thread(target=stream), threading.Thread(target=waiting)]
    for thread in threads:
        thread.start()
    assert first_chunk.wait(60)
    os.kill(engine, signal.SIGKILL)
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive(), "a request hung after the engine died"
    events = [line for line in outcome["lines"] if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2][len("data: "):])
    assert outcome["plain"].status_code == 503 and outcome["plain"].json()["error"]["code"] == "engine_dead"
    health = httpx.get(server.url("/health"))
    assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
    assert _complete(server, headers).status_code == 503
    assert not pid_alive(engine)


def test_sigterm_after_engine_death(server):
    children = server.child_pids()
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    assert time.monotonic() - start < 10
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)]
    assert port_is_free(server.port)
