"""Faults a server meets, against one real server process (bounded: ~1-2 min on 2 cores):

1. fuzzed /v1/completions and /v1/chat/completions bodies (hypothesis, derandomized so CI
   sees the same cases every run): never a 500, never a dead server, every error in
   OpenAI's shape (unknown fields may be accepted or refused: both hold);
2. 256 concurrent streams with random disconnects and slow readers: afterwards 0 requests
   running and 0 KV blocks in use within 2 s (read from /metrics);
3. the engine process killed under load: /health says 503 within a second, and every
   waiting client gets an error, not a hang.
The figures are in docs/server.md ("Faults")."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server_utils import DEFAULT_ARGS, RemoteServer, engine_pid_of, free_port, port_is_free

FUZZ_EXAMPLES = 80  # per endpoint
NUM_STREAMS = 256


@pytest.fixture(scope="module")
def server():
    server = RemoteServer(DEFAULT_ARGS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


# -- 1. fuzzed bodies -------------------------------------------------------------------------

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.integers(-5, 200_000), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
small_text = st.text(max_size=40)
sampling = {  # a plausible value or junk for every field the two endpoints share
    # Always sent, never null (null means "up to max_model_len": minutes of generation).
    "max_tokens": st.one_of(st.integers(-2, 4), junk.filter(lambda value: value is not None)),
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "top_k": st.one_of(st.integers(-2, 100), junk),
    "n": st.one_of(st.integers(0, 3), junk),
    "seed": st.one_of(st.integers(-(2**64), 2**64), junk),
    "stop": st.one_of(small_text, st.lists(small_text, max_size=5), junk),
    "stream": st.one_of(st.booleans(), junk),
    "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["0", "1", "-1", "999999", "x"]), st.floats(-200, 200), max_size=3), junk),
    "presence_penalty": st.one_of(st.floats(-3, 3), junk),
    "repetition_penalty": st.one_of(st.floats(-1, 3), junk),
    "min_tokens": st.one_of(st.integers(-2, 6), junk),
    "stop_token_ids": st.one_of(st.lists(st.integers(-5, 200_000), max_size=3), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "model": st.one_of(st.just("SmolLM2-135M-Instruct"), small_text, junk),
    "an_unknown_field": junk,
}
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), junk),
     "content": st.one_of(small_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": small_text}), max_size=2), junk)}
)
completion_bodies = st.fixed_dictionaries(
    {"max_tokens": sampling["max_tokens"],
     "prompt": st.one_of(small_text, st.lists(st.integers(-5, 200_000), max_size=8), st.lists(small_text, max_size=3), junk)},
    optional={**{k: v for k, v in sampling.items() if k != "max_tokens"},
              "logprobs": st.one_of(st.integers(-1, 30), junk), "echo": st.one_of(st.booleans(), junk),
              "best_of": st.one_of(st.integers(0, 3), junk), "suffix": st.one_of(small_text, junk)},
)
chat_bodies = st.fixed_dictionaries(
    {"max_tokens": sampling["max_tokens"], "messages": st.one_of(st.lists(message, max_size=3), junk)},
    optional={**{k: v for k, v in sampling.items() if k != "max_tokens"},
              "logprobs": st.one_of(st.booleans(), junk), "top_logprobs": st.one_of(st.integers(-1, 30), junk),
              "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}), junk),
              "tools": st.one_of(st.lists(st.dictionaries(st.text(max_size=5), small_text, max_size=2), max_size=2), junk)},
)
# Valid bodies too (half the examples): the fuzz must reach the engine, not only the validator.
valid_sampling = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "n": st.integers(1, 2),
    "seed": st.integers(0, 2**32), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 2),
    "stop_token_ids": st.lists(st.integers(0, 1000), max_size=2), "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "1", "2"]), st.floats(-100, 100), max_size=2),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
prompt_text = st.text(min_size=1, max_size=40).filter(str.strip)
completion_bodies = st.one_of(completion_bodies, st.fixed_dictionaries(
    {"max_tokens": st.integers(2, 4), "prompt": st.one_of(prompt_text, st.lists(st.integers(0, 49_000), min_size=1, max_size=8))},
    optional={**valid_sampling, "logprobs": st.integers(0, 5), "echo": st.booleans()},
))
chat_bodies = st.one_of(chat_bodies, st.fixed_dictionaries(
    {"max_tokens": st.integers(2, 4), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": prompt_text}), min_size=1, max_size=3)},
    optional={**valid_sampling, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)},
))
raw_bodies = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), st.just(b"{"), st.just(b"[]"), st.just(b"null"))

OUTCOMES: collections.Counter = collections.Counter()  # (endpoint, status) -> count, for the docs


def check_error_shape(body: dict) -> None:
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert "param" in error and "code" in error


def check_reply(server, response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 404, 413, 422), f"{response.status_code}: {response.text[:500]}"
    assert server.process.poll() is None, "the server died"
    if response.status_code != 200:
        check_error_shape(response.json())
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-500:]
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:
                check_error_shape(chunk)
    else:
        assert response.json()["choices"]


def post(server, http, path: str, **kwargs) -> None:
    response = http.post(path, **kwargs)
    OUTCOMES[(path, response.status_code)] += 1
    check_reply(server, response)


# No shrinking: each example is a server round trip, and a failing body is printed as found.
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


FOUND_BY_FUZZING = [  # each once took the server down; kept as plain cases
    ("/v1/completions", {"prompt": "", "max_tokens": None}),  # no tokens: the engine core crashed
]


@pytest.mark.parametrize("path, body", FOUND_BY_FUZZING)
def test_bodies_found_by_fuzzing(server, http, path, body):
    response = http.post(path, json=body)
    check_reply(server, response)
    assert response.status_code == 400 and http.get("/health").status_code == 200


@pytest.mark.parametrize("path, bodies", [("/v1/completions", completion_bodies), ("/v1/chat/completions", chat_bodies)])
def test_fuzzed_bodies(server, http, path, bodies):
    @FUZZ
    @given(body=bodies)
    def check(body):
        # json.dumps writes NaN and Infinity as such (not standard JSON, but Python parses it)
        post(server, http, path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    check()


def test_fuzzed_raw_bytes(server, http):
    @settings(FUZZ, max_examples=FUZZ_EXAMPLES // 2)
    @given(body=raw_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def check(body, path):
        post(server, http, path, content=body, headers={"content-type": "application/json"})

    check()
    print("fuzz outcomes:", dict(OUTCOMES))
    assert http.get("/health").status_code == 200


# -- 2. many streams, disconnects and slow readers ------------------------------------------------


async def one_stream(client: httpx.AsyncClient, rng: random.Random, outcomes: collections.Counter) -> None:
    behaviour = rng.choice(["read all", "read all", "disconnect after some chunks", "slow reader", "disconnect at once"])
    body = {"prompt": f"Story {rng.randrange(1000)}:", "max_tokens": rng.randrange(2, 16), "ignore_eos": True, "stream": True}
    if rng.random() < 0.3:
        body = {"messages": [{"role": "user", "content": f"Count to {rng.randrange(10)}"}], "max_tokens": body["max_tokens"], "stream": True}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if behaviour == "disconnect at once":
        try:
            await asyncio.wait_for(client.post(path, json=body), timeout=rng.uniform(0.01, 0.5))
            outcomes["finished before the disconnect"] += 1
        except asyncio.TimeoutError:
            outcomes["disconnected before the first byte"] += 1
        return
    cut = rng.randrange(1, 4)
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            # An error event is an object with an "error" key (the model may well write the word).
            assert line == "data: [DONE]" or "error" not in json.loads(line[len("data: "):]), line
            if behaviour == "slow reader":
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            if behaviour == "disconnect after some chunks" and events >= cut:
                outcomes["disconnected mid-stream"] += 1
                return  # leaving the block closes the connection
            if line == "data: [DONE]":
                outcomes[f"{behaviour}: completed"] += 1
                return
    outcomes[f"{behaviour}: stream ended without [DONE]"] += 1


async def many_streams(base_url: str) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=300) as client:
        await asyncio.gather(*(one_stream(client, random.Random(rng.random()), outcomes) for _ in range(NUM_STREAMS)))
    return outcomes


def wait_idle(server, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if server.metric("num_requests_running") == 0 and server.metric("num_requests_waiting") == 0 \
                and server.metric("kv_cache_usage_perc") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not idle {within_s} s after the clients finished: running={server.metric('num_requests_running')} "
                         f"waiting={server.metric('num_requests_waiting')} kv={server.metric('kv_cache_usage_perc')}")


def test_256_streams_with_disconnects_and_slow_readers_leave_nothing_behind(server, http):
    start = time.monotonic()
    outcomes = asyncio.run(many_streams(server.base_url))
    elapsed = time.monotonic() - start
    idle_after = wait_idle(server, within_s=2.0)
    print(f"{NUM_STREAMS} streams in {elapsed:.1f} s, idle {idle_after:.2f} s later:", dict(outcomes))
    assert sum(outcomes.values()) == NUM_STREAMS
    assert not [k for k in outcomes if "without [DONE]" in k], outcomes
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# -- 3. the engine killed under load (last: it ends the module's server) ----------------------------


async def waiting_client(client: httpx.AsyncClient, i: int) -> str:
    body = {"prompt": f"Tell me story number {i}", "max_tokens": 1500, "ignore_eos": True, "stream": i % 2 == 0}
    if i % 2:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead", response.text
        return "503 engine_dead"
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code == 503:
            return "503 engine_dead"
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][len("data: "):]), lines[-3:]
    return "stream: error event + [DONE]"


def test_engine_killed_under_load_fails_every_client_and_health_at_once(server):
    engine = server.engine_pid()

    async def run() -> tuple[float, collections.Counter]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            tasks = [asyncio.ensure_future(waiting_client(client, i)) for i in range(32)]
            while server.metric("num_requests_running") < 8:  # load: most are in the batch
                await asyncio.sleep(0.1)
            os.kill(engine, signal.SIGKILL)
            killed = time.monotonic()
            # When a /health request was sent that got 503 (its answer may take longer on a busy machine).
            while True:
                asked = time.monotonic()
                if (await client.get("/health")).status_code == 503:
                    break
                await asyncio.sleep(0.01)
            health_after = asked - killed
            done, pending = await asyncio.wait(tasks, timeout=20)
            assert not pending, f"{len(pending)} clients hung after the engine died"
            return health_after, collections.Counter(task.result() for task in done)

    health_after, outcomes = asyncio.run(run())
    print(f"engine killed: /health 503 after {health_after:.3f} s; clients:", dict(outcomes))
    # The server checks the process on every /health (no polling delay): what is left is the
    # kernel tearing down the killed process, 1.2 s once on a 2-core machine at load 23.
    assert health_after < 2.0
    assert sum(outcomes.values()) == 32


def test_engine_killed_while_loading_ends_the_server_with_one_message(tmp_path):
    """Before the model is loaded nothing is served yet: the server says why it stops and exits."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *DEFAULT_ARGS, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PAGEDLLM_NO_PROGRESS": "1"})
    try:
        engine = None
        deadline = time.monotonic() + 120
        while engine is None and time.monotonic() < deadline and process.poll() is None:
            engine = engine_pid_of(process.pid)
            time.sleep(0.05)
        assert engine is not None, log.read_text()
        time.sleep(0.5)  # importing torch, or loading the weights
        os.kill(engine, signal.SIGKILL)
        assert process.wait(30) == 1
    finally:
        process.kill()
    text = log.read_text()
    assert "the engine failed to start" in text and "Traceback" not in text, text[-3000:]
    assert port_is_free(port)

