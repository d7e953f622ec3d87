"""A real `pagedllm serve` process on a free port, for the server tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

# The bundled model, small and quick on CPU; 256 MiB of KV cache (5,800 tokens) is plenty.
DEFAULT_ARGS = ["--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "2048"]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RemoteServer:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pagedllm-server-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *args, "--port", str(self.port)]
        environment = {**os.environ, "PAGEDLLM_NO_PROGRESS": "1", **(env or {})}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"server not healthy after {START_TIMEOUT_S} s:\n{self.read_log()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def read_log(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def child_pids(self) -> list[int]:
        """Every child process of the server (the engine core, multiprocessing's helper)."""
        return child_pids(self.process.pid)

    def engine_pid(self) -> int:
        """The engine core: the child that multiprocessing spawned."""
        pid = engine_pid_of(self.process.pid)
        if pid is None:
            raise RuntimeError(f"no engine core process under the server (pid {self.process.pid})")
        return pid

    def api_server_pids(self) -> dict[int, int]:
        """With several API server processes: index -> pid, from the server's start-up log."""
        found = re.findall(r"API server (\d+): pid (\d+)", self.read_log())
        return {int(index): int(pid) for index, pid in found}

    def metric(self, name: str) -> float:
        text = httpx.get(self.url("/metrics"), timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"pagedllm:{name}{{") or line.startswith(f"pagedllm:{name} "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"metric pagedllm:{name} not in /metrics")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        os.unlink(self.log.name)


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def engine_pid_of(server_pid: int) -> int | None:
    """The server's engine core process (the child multiprocessing spawned), if it has one yet."""
    for pid in child_pids(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    return pid
        except OSError:
            pass
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
