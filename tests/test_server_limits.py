"""Limits and graceful shutdown of a real server: a body over --max-request-body-bytes gets
413 in OpenAI's shape without being read (by its Content-Length, or counted chunk by chunk);
SIGTERM refuses new requests, lets running ones finish within --shutdown-timeout, ends the
rest with finish_reason "abort", and leaves no process behind."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer, pid_alive, port_is_free

LIMIT = 64 * 1024
SHUTDOWN_TIMEOUT = 10  # long enough for the short request to end on a busy machine


@pytest.fixture(scope="module")
def server():
    server = RemoteServer([*DEFAULT_ARGS, "--max-request-body-bytes", "64KiB", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)])
    yield server
    server.close()


def raw_request(server, head: bytes, body_parts: list[bytes] = ()) -> tuple[int, dict]:
    """Send a request by hand (so the client does not send the whole body first); read the reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + head + b"\r\n")
        for part in body_parts:
            s.sendall(part)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def chunked(body: bytes, size: int) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]


def assert_too_large(status: int, body: dict) -> None:
    assert status == 413
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "--max-request-body-bytes" in error["message"]


def test_declared_oversized_body_is_refused_on_its_headers(server):
    # 100 MB declared, none sent: the reply comes without the server waiting for the body.
    assert_too_large(*raw_request(server, b"Content-Length: 100000000\r\n"))


def test_chunked_body_is_refused_at_the_chunk_that_crosses_the_limit(server):
    body = b'{"prompt": "' + b"x" * LIMIT + b'"}'  # more chunks than this are never read
    assert_too_large(*raw_request(server, b"Transfer-Encoding: chunked\r\n", chunked(body, 16 * 1024)))


def test_bodies_under_the_limit_are_served_chunked_or_not(server):
    body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
    status, reply = raw_request(server, b"Transfer-Encoding: chunked\r\n", [*chunked(body, 7), b"0\r\n\r\n"])
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    response = httpx.post(server.url("/v1/completions"), json={"prompt": "a " * 200, "max_tokens": 1}, timeout=120)
    assert response.status_code == 200, response.text
    too_big = httpx.post(server.url("/v1/completions"), content=b" " * (LIMIT + 1), timeout=60)
    assert too_big.status_code == 413


def test_sigterm_drains_then_aborts_and_exits(server):
    children = server.child_pids()
    results: dict[str, object] = {}
    started = {name: threading.Event() for name in ("short", "long")}
    ended: dict[str, float] = {}

    def stream(name: str, max_tokens: int) -> None:
        body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started[name].set()
        results[name] = events
        ended[name] = time.monotonic()

    def plain() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
        results["plain"] = httpx.post(server.url("/v1/completions"), json=body, timeout=60)

    threads = [threading.Thread(target=stream, args=("short", 3)), threading.Thread(target=stream, args=("long", 2000)),
               threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    assert started["short"].wait(60) and started["long"].wait(60)
    time.sleep(0.5)  # the plain request is in too
    keep_alive = httpx.Client(timeout=10)
    assert keep_alive.get(server.url("/health")).status_code == 200  # a connection open before SIGTERM
    signal_time = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # New requests are refused: no new connections, and 503 on one already open.
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/health"), timeout=5)
    try:
        refused = keep_alive.get(server.url("/health"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass  # or the idle connection was already closed: refused either way
    for thread in threads:
        thread.join(SHUTDOWN_TIMEOUT + 20)
        assert not thread.is_alive(), "a request hung through the shutdown"
    server.process.wait(60)
    assert server.process.returncode == 0, server.read_log()[-3000:]
    aborted_after = ended["long"] - signal_time
    assert SHUTDOWN_TIMEOUT - 0.5 < aborted_after < SHUTDOWN_TIMEOUT + 10, aborted_after

    def finish_reasons(events: list[str]) -> list[str]:
        assert events[-1] == "[DONE]"
        return [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]

    assert finish_reasons(results["short"]) == ["length"]  # finished within the timeout
    assert finish_reasons(results["long"]) == ["abort"]
    plain_reply = results["plain"]
    assert plain_reply.status_code == 200 and plain_reply.json()["choices"][0]["finish_reason"] == "abort"
    deadline = time.monotonic() + 2
    while any(pid_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if pid_alive(pid)], "processes left behind"
    assert port_is_free(server.port)
