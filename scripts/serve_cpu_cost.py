"""CPU time per streamed token in each process of `pagedllm serve` (HTTP processes, engine cores)
while `pagedllm bench serve` streams completions: where a server's ceiling comes from.

    PYTHONPATH=. .venv/bin/python scripts/serve_cpu_cost.py [DATA_PARALLEL_SIZE] [NUM_PROMPTS] [API_SERVER_COUNT]

API_SERVER_COUNT defaults to the server's default (the data-parallel size). On the CPU the engine
is the bottleneck, so the HTTP process is never behind; `--starve-http` gives the HTTP process
(of one API server) nice 19, so that the engine outruns it as a GPU does (run it all on one core for that, e.g.
`taskset -c 1 ... serve_cpu_cost.py 1 64 --starve-http`): then its cost per token is the one
that sets a server's ceiling (several steps' tokens go out in one chunk).

The model is the `tiny` random-weight Llama (dummy weights); prompts of 16 tokens, 128 out.
Needs psutil (installed with the test and bench extras, through accelerate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedllm.benchmarks.server_process import free_port, start_server  # noqa: E402
from pagedllm.benchmarks.workloads import write_config_folder  # noqa: E402

OUTPUT_LEN = 128


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    starve_http = "--starve-http" in sys.argv
    argv = [a for a in sys.argv if a != "--starve-http"]
    size = int(argv[1]) if len(argv) > 1 else 1
    num_prompts = int(argv[2]) if len(argv) > 2 else 64
    api_servers = ["--api-server-count", argv[3]] if len(argv) > 3 else []
    folder = write_config_folder("tiny", tempfile.mkdtemp())
    port = free_port()
    env = {**os.environ, "PAGEDLLM_NO_PROGRESS": "1"}
    server = start_server([folder, "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "1024",
                           "--data-parallel-size", str(size), *api_servers], port,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        parent = psutil.Process(server.pid)
        processes = [parent] + parent.children(recursive=True)
        if starve_http:
            parent.nice(19)  # the HTTP process, with one API server
        before = {p.pid: _cpu_seconds(p) for p in processes}
        result_path = os.path.join(tempfile.mkdtemp(), "bench.json")
        subprocess.run(
            [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
             "--num-prompts", str(num_prompts), "--random-input-len", "16", "--random-output-len", str(OUTPUT_LEN),
             "--vocab-size", "1000", "--request-rate", "inf", "--output-json", result_path],
            env=env, capture_output=True, check=True,
        )
        with open(result_path) as f:
            result = json.load(f)
        tokens = result["completed"] * OUTPUT_LEN
        print(f"{tokens} tokens streamed at {result['output_token_throughput']:.0f} tok/s")
        for p in processes:
            print(f"{p.pid} {' '.join(p.cmdline())[:80]}: {(_cpu_seconds(p) - before[p.pid]) / tokens * 1e6:.1f} µs CPU per token")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
