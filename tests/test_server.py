"""The OpenAI-compatible server, as a real process on a free port, through the official
`openai` client and plain HTTP: results, streaming, usage, errors, load, disconnects and
SIGTERM. One server for the module (the bundled model); small max_tokens throughout."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer, pid_alive, port_is_free

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    server = RemoteServer([*DEFAULT_ARGS, "--shutdown-timeout", "2"])  # the SIGTERM test aborts its stream
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def _tokenize(server, **body) -> int:
    return httpx.post(server.url("/tokenize"), json=body, timeout=30).json()["count"]


# -- results --------------------------------------------------------------------------------------


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_the_readme_curl_command(server):
    body = {"model": MODEL, "prompt": "Hello, my name is", "max_tokens": 20}
    response = httpx.post(server.url("/v1/completions"), json=body, headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["model"] == MODEL
    assert isinstance(data["choices"][0]["text"], str) and data["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= data["usage"]["completion_tokens"] <= 20


def test_completion_stream_concatenates_to_the_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert "Paris" in full.choices[0].text


def test_chat_stream_concatenates_to_the_message(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert "Paris" in streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [full.choices[0].finish_reason]


def test_n_completions(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=2, temperature=1.0, seed=7)
    assert [c.index for c in completion.choices] == [0, 1]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=2, temperature=1.0, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens <= 10
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=2, temperature=0, stream=True))
    finished = {choice.index for c in streamed for choice in c.choices if choice.finish_reason}
    assert finished == {0, 1}


def test_prompt_forms_and_echo(client, server):
    two = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    ids = httpx.post(server.url("/tokenize"), json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == two.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + two.choices[0].text
    assert echoed.usage.prompt_tokens == len(ids)


def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    lp = result.choices[0].logprobs
    num_prompt, num_out = result.usage.prompt_tokens, result.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == num_prompt + num_out
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, value, top in zip(lp.tokens[num_prompt:], lp.token_logprobs[num_prompt:], lp.top_logprobs[num_prompt:]):
        assert value <= 0 and 3 <= len(top) <= 4 and token in top
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the chosen one is the best
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens[num_prompt:]


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_stop_strings(client):
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = text.strip()[2:5]
    expected = text[: text.index(stop)]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "never"])
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_include_usage_and_exact_counts(client, server):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == _tokenize(server, prompt=PROMPT)
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.total_tokens == 7 + chunks[-1].usage.prompt_tokens
    chat_chunks = list(
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    )
    usage = chat_chunks[-1].usage
    assert usage.prompt_tokens == _tokenize(server, messages=CHAT)
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True)
    assert usage.completion_tokens == full.usage.completion_tokens == len(full.choices[0].logprobs.content)


def test_vllm_extras(client):
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.5,
        user="test", extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6,
                                 "stop_token_ids": [2], "skip_special_tokens": True},
    )
    assert result.usage.completion_tokens == 6
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.5,
        user="test", extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6,
                                 "stop_token_ids": [2], "skip_special_tokens": True},
    )
    assert again.choices[0].text == result.choices[0].text  # same seed, same text


def test_health_version_tokenize_detokenize(server):
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]
    ids = httpx.post(server.url("/tokenize"), json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server.url("/detokenize"), json={"tokens": ids}).json()["prompt"] == "Hello world"


# -- errors ---------------------------------------------------------------------------------------

LONG_PROMPT = "hello " * 3000


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "sometimes"}, 400, "stream"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 300}}, 400, "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "store": "yes", "metadata": 5, "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "prompt"),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_carries_on(server, client, path, body, status, param):
    response = httpx.post(server.url(path), json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if body.get("prompt") == LONG_PROMPT:
        num_tokens = _tokenize(server, prompt=LONG_PROMPT)
        assert str(num_tokens) in error["message"] and "2048" in error["message"]
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_unknown_fields_are_accepted_and_logged_once(server, client):
    extras = {"store": False, "metadata": {"run": "1"}, "service_tier": "auto", "bogus_field": 1}
    for _ in range(2):
        result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=extras)
        assert result.choices[0].message.content is not None
    log = server.read_log()
    assert log.count("unknown field 'bogus_field'") == 1 and "unknown field 'service_tier'" in log


def test_logit_bias_forces_and_bans_tokens(client, server):
    forced = _tokenize_ids(server, " banana")[0]
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(forced): 100})
    assert result.choices[0].text == " banana" * 4
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    first = _tokenize_ids(server, plain.choices[0].text)[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text


def _tokenize_ids(server, text: str) -> list[int]:
    return httpx.post(server.url("/tokenize"), json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]


def test_malformed_json_and_openai_client_errors(server, client):
    response = httpx.post(server.url("/v1/completions"), content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2)
    assert "max_model_len" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


# -- load and disconnects -------------------------------------------------------------------------


async def _stream_tokens(http: httpx.AsyncClient, max_tokens: int, prompt: str) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
    return usage["completion_tokens"], text


async def _cut_after_first_chunk(http: httpx.AsyncClient, i: int) -> None:
    body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return  # leaving the block closes the connection mid-stream


def test_64_concurrent_streams_then_16_disconnects(server):
    queued_before = server.metric("request_queue_time_seconds_count")

    async def run() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as http:
            results = await asyncio.gather(*(_stream_tokens(http, 8, f"Request {i} says") for i in range(64)))
            assert [n for n, _ in results] == [8] * 64
            assert all(text for _, text in results)
            await asyncio.gather(*(_cut_after_first_chunk(http, i) for i in range(16)))

    asyncio.run(run())
    deadline = time.monotonic() + 2.0
    while True:
        running, usage = server.metric("num_requests_running"), server.metric("kv_cache_usage_perc")
        if running == 0 and usage == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (running, usage) == (0, 0)
    assert server.metric("num_requests_waiting") == 0
    assert server.metric("generation_tokens_total") >= 64 * 8
    # every request's queue time (arrival to first scheduled) was recorded once it was scheduled
    assert server.metric("request_queue_time_seconds_count") - queued_before == 64 + 16
    metrics = httpx.get(server.url("/metrics")).text
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total"):
        assert f"pagedllm:{name}" in metrics


def _bench_serve(server, tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`pagedllm bench serve` against the module's server: (the finished process, its JSON result)."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", server.base_url,
               "--random-input-len", "16", "--request-rate", "inf", "--output-json", str(out), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


def test_bench_serve_load_generator(server, tmp_path):
    done, result = _bench_serve(server, tmp_path, "--num-prompts", "6", "--random-output-len", "4", "--max-concurrency", "3")
    assert "TTFT" in done.stdout and "TPOT" in done.stdout and "ITL" in done.stdout
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_output_tokens"] == 6 * 4 and result["total_prompt_tokens"] == 6 * 16
    assert result["ttft_ms"]["p50"] > 0 and result["output_token_throughput"] > 0


def test_bench_serve_from_several_client_processes(server, tmp_path):
    """--client-processes: the requests split over processes, every one counted once in one result."""
    done, result = _bench_serve(server, tmp_path, "--num-prompts", "7", "--random-output-len", "3", "--client-processes", "3")
    assert "3 client processes" in done.stdout
    assert (result["completed"], result["failed"], result["client_processes"]) == (7, 0, 3)
    assert result["total_output_tokens"] == 7 * 3 and result["total_prompt_tokens"] == 7 * 16
    assert result["num_prompts"] == 7 and result["duration_s"] > 0


# -- shutdown (last: it ends the module's server) -------------------------------------------------


def test_sigterm_ends_server_and_engine_within_10s(server):
    engine = server.engine_pid()
    children = server.child_pids()
    first_chunk = threading.Event()

    def stream_forever() -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        first_chunk.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=stream_forever, daemon=True)
    thread.start()
    assert first_chunk.wait(60)
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 2
    while any(pid_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine), "the engine core process outlived the server"
    assert not [pid for pid in children if pid_alive(pid)], "orphaned child processes"
    assert port_is_free(server.port)
    thread.join(10)
