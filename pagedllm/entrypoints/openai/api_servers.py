"""Several API server processes on one port: `pagedllm serve --api-server-count K` (vLLM's
flag), for when one HTTP process's CPU limits streaming (data-parallel replicas of a small
model can produce more tokens per second than one process can stream).

    pagedllm serve (the parent: binds the port, starts and stops the rest, serves nothing)
      ├─ engine core 0 .. N-1        started once, here (EngineCoreHandle)
      ├─ API server 0 .. K-1         spawned with the listening socket; each accepts on it, and
      │    └─ a client per core        reaches every core as front end k (AsyncEngineClient.connect);
      │                                routing uses only its own requests' outstanding tokens
      └─ PROMETHEUS_MULTIPROC_DIR    a temporary folder where every API server writes its metrics

The kernel hands each new connection to one of the processes waiting on the socket. The API
servers load no model code, as with one. SIGINT / SIGTERM: each API server drains as a single
server does, then the cores are stopped. An API server that exits by itself (it crashed, or a
core failed to start) stops the whole server with an error: never half a server. A core that
dies is handled by every API server as with one (503s naming the replica).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile

from pagedllm.config import EngineArgs
from pagedllm.engine.async_client import AsyncEngineClient, EngineStartError
from pagedllm.engine.core_handle import EngineCoreAddress, EngineCoreHandle, stop_process
from pagedllm.engine.core_proc import exit_with_parent
from pagedllm.engine.dp_client import DataParallelClient, describe_env, replica_envs_for
from pagedllm.entrypoints.openai.api_server import serve_client, serve_until_stopped
from pagedllm.entrypoints.openai.serving_chat import ChatOptions
from pagedllm.entrypoints.openai.shutdown import FLUSH_TIMEOUT_S
from pagedllm.logger import init_logging

logger = logging.getLogger("pagedllm")

_WATCH_INTERVAL_S = 0.5


def run_api_servers(
    args: argparse.Namespace, engine_args: EngineArgs, chat_options: ChatOptions, sock: socket.socket, count: int
) -> int:
    """Start the cores and `count` API servers on `sock`; return the exit code once stopped."""
    stop_signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    metrics_dir = tempfile.mkdtemp(prefix="pagedllm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client as each API server imports it
    cores: list[EngineCoreHandle] = []
    servers: list[multiprocessing.Process] = []
    try:
        try:
            envs = replica_envs_for(engine_args, args.data_parallel_size)
        except ValueError as e:
            logger.error("%s", e)
            return 1
        for index, env in enumerate(envs):
            cores.append(EngineCoreHandle.start(engine_args, num_front_ends=count, env=env))
            logger.info("data-parallel replica %d: engine core pid %d (%s)", index, cores[-1].process.pid, describe_env(env))
        context = multiprocessing.get_context("spawn")
        addresses = [core.address for core in cores]
        for k in range(count):
            server = context.Process(target=_run_api_server, args=(k, args, chat_options, sock, addresses), name=f"pagedllm-api-server-{k}")
            server.start()
            servers.append(server)
            logger.info("API server %d: pid %d", k, server.pid)
        sock.close()  # the API servers hold it now: once they close theirs, the port is free
        return _watch(servers, stop_signals)
    finally:
        _stop_api_servers(servers, args.shutdown_timeout + FLUSH_TIMEOUT_S + 5.0)
        for core in cores:
            core.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("engine stopped")


def _watch(servers: list[multiprocessing.Process], stop_signals: list[int]) -> int:
    """Wait for SIGINT / SIGTERM (0) or an API server that exits by itself (1)."""
    while not stop_signals:
        for k, server in enumerate(servers):
            if not server.is_alive():
                logger.error("API server %d (pid %d) exited with code %s: stopping the server", k, server.pid, server.exitcode)
                return 1
        multiprocessing.connection.wait([s.sentinel for s in servers], timeout=_WATCH_INTERVAL_S)
    return 0


def _stop_api_servers(servers: list[multiprocessing.Process], timeout: float) -> None:
    """SIGTERM to each (they drain as one server does), then wait for all."""
    for server in servers:
        if server.is_alive():
            server.terminate()
    for server in servers:
        stop_process(server, timeout)


def _run_api_server(index: int, args: argparse.Namespace, chat_options: ChatOptions, sock: socket.socket, addresses: list[EngineCoreAddress]) -> None:
    """Entry point of API server process `index`."""
    exit_with_parent()
    init_logging()
    serve_until_stopped(_serve(index, args, chat_options, sock, addresses), sock)


async def _serve(index: int, args: argparse.Namespace, chat_options: ChatOptions, sock: socket.socket, addresses: list[EngineCoreAddress]) -> None:
    try:
        if len(addresses) > 1:
            client = await DataParallelClient.connect(addresses, index)
        else:
            client = await AsyncEngineClient.connect(addresses[0], index)
    except EngineStartError:
        if index > 0:  # API server 0 says why, once
            raise SystemExit(1) from None
        raise
    await serve_client(args, client, chat_options, sock, api_server=index)
