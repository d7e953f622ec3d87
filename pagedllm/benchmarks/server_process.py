"""`pagedllm serve` as a child process, for the benchmarks and scripts that measure through
the server (serve_vs_offline.py, scripts/gpu_tp_bench.py, scripts/serve_cpu_cost.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], port: int, timeout: float = 600, **popen) -> subprocess.Popen:
    """`pagedllm serve *serve_args --port port` (progress bars off), returned once /health answers
    200. RuntimeError if it exits first or is not healthy within `timeout` seconds (then it is
    killed). popen: more subprocess.Popen keywords (stdout, stderr)."""
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *serve_args, "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "PAGEDLLM_NO_PROGRESS": "1"}, **popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s")
