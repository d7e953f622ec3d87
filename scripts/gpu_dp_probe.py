"""Where data parallelism through the server stops scaling (issue 14): run `pagedllm serve`
smollm2-135m (dummy weights) with several (--data-parallel-size, --api-server-count) and load it
with `pagedllm bench serve --client-processes N` for several N, sampling every process's CPU time
over the run (/proc), so the process that saturates a core shows up.

    PYTHONPATH=. OUT=/tmp/out python scripts/gpu_dp_probe.py [--prompts 2048] [--configs 1x1,2x2] [--clients 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds() -> dict[int, tuple[float, str]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            continue
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def main() -> None:
    from pagedllm.benchmarks.server_process import free_port, start_server
    from pagedllm.benchmarks.workloads import write_config_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--configs", default="1x1,2x2", help="DPxAPI pairs")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--tokenizer", action="store_true", help="serve with the tokenizer (per-token chunks)")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", tempfile.mkdtemp())
    work = tempfile.mkdtemp(prefix="dp-probe-")
    folder = write_config_folder("smollm2-135m", work)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PAGEDLLM_NO_PROGRESS": "1"}
    for config in args.configs.split(","):
        dp, api = (int(x) for x in config.split("x"))
        port = free_port()
        serve = [folder, "--load-format", "dummy", "--max-model-len", "2048", "--data-parallel-size", str(dp),
                 "--api-server-count", str(api)]
        if not args.tokenizer:
            serve.append("--skip-tokenizer-init")
        server = start_server(serve, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                path = os.path.join(work, f"dp{dp}api{api}c{clients}.json")
                before = cpu_seconds()
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve",
                                "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", str(args.prompts),
                                "--random-input-len", "256", "--random-output-len", "256", "--vocab-size", "49152",
                                "--request-rate", "inf", "--client-processes", str(clients), "--output-json", path],
                               env=env, stdout=subprocess.DEVNULL, check=True)
                wall = time.perf_counter() - start
                after = cpu_seconds()
                result = json.load(open(path))
                busy = sorted(((after[pid][0] - before.get(pid, (0.0, ""))[0]) / wall, after[pid][1])
                              for pid in after)[-8:][::-1]
                line = {"dp": dp, "api_servers": api, "client_processes": clients,
                        "output_tok_s": round(result["output_token_throughput"]), "failed": result["failed"],
                        "duration_s": round(result["duration_s"], 2),
                        "busiest": [(round(c, 2), cmd) for c, cmd in busy]}
                print(json.dumps(line), flush=True)
                with open(os.path.join(out_dir, "dp_probe.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
