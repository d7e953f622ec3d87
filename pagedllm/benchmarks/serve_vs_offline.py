"""What the server keeps of the engine's offline throughput, measured A/B in one run.

    python -m pagedllm.benchmarks.serve_vs_offline --concurrency 32 --num-prompts 64 \\
        --input-len 128 --output-len 64 --rounds 3

Starts `pagedllm serve` (max_num_seqs = concurrency) and an in-process LLM with the same
options, then alternates: the same requests (random token ids, EOS ignored, greedy)
offline, all submitted at once, and through the server with `bench serve` at that
concurrency. Alternating rounds puts both under the same machine load, which matters on
shared CPU machines; the ratio of the medians is the figure. CPU time per output token
(this process offline; the server and its engine process online, from /proc) is the
figure that other processes on the machine do not move.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time

from pagedllm.benchmarks import serve
from pagedllm.benchmarks.server_process import free_port, start_server


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (Linux /proc), all threads."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _with_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *map(int, f.read().split())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="server concurrency = engine max_num_seqs (default: 32)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per round (default: 64)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (default: 3)")
    parser.add_argument("--engine-options", default="", help="more `pagedllm serve` engine options, e.g. '--dtype float32' (default: none)")
    parser.add_argument("--output-json", default=None, help="write the figures here (default: none)")
    args = parser.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.entrypoints.cli_args import engine_args_from
    from pagedllm.entrypoints.cli import make_parser

    engine_options = [*args.engine_options.split(), "--max-num-seqs", str(args.concurrency)]
    engine_args = engine_args_from(make_parser().parse_args(["serve", *engine_options]))
    port = free_port()
    try:
        server = start_server(engine_options, port, timeout=300)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    try:
        bench_args = argparse.Namespace(
            base_url=f"http://127.0.0.1:{port}", model=None, api_key=None, num_prompts=args.num_prompts, request_rate="inf",
            max_concurrency=args.concurrency, dataset="random", random_input_len=args.input_len,
            random_output_len=args.output_len, vocab_size=32000, seed=0, timeout=3600.0, client_processes=1,
        )
        prompts = [r.prompt for r in serve.load_requests(bench_args, bench_args.vocab_size)]
        os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
        llm = LLM(**{k: v for k, v in vars(engine_args).items()})
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        server_pids = _with_children(server.pid)
        num_tokens = args.num_prompts * args.output_len
        rounds = []
        for i in range(args.rounds):
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            offline = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
            offline_cpu = (time.process_time() - cpu_start) / num_tokens
            cpu_start = _cpu_seconds(server_pids)
            online = serve.run(bench_args)
            server_cpu = (_cpu_seconds(server_pids) - cpu_start) / (num_tokens + 4)  # + bench's test request
            assert online["failed"] == 0, online["errors"]
            rounds.append({"offline_output_tok_s": offline, "server_output_tok_s": online["output_token_throughput"],
                           "offline_cpu_ms_per_token": offline_cpu * 1000, "server_cpu_ms_per_token": server_cpu * 1000,
                           "server_ttft_ms_mean": online["ttft_ms"]["mean"], "server_tpot_ms_mean": online["tpot_ms"]["mean"],
                           "load_average": os.getloadavg()[0]})
            print(f"round {i}: offline {offline:.1f} output tok/s ({offline_cpu * 1000:.1f} CPU ms/token), server "
                  f"{online['output_token_throughput']:.1f} output tok/s ({server_cpu * 1000:.1f} CPU ms/token) at "
                  f"concurrency {args.concurrency}; load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    offline_median, server_median = median("offline_output_tok_s"), median("server_output_tok_s")
    cpu_ratio = median("offline_cpu_ms_per_token") / median("server_cpu_ms_per_token")
    result = {"concurrency": args.concurrency, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "rounds": rounds, "offline_median": offline_median,
              "server_median": server_median, "server_over_offline": server_median / offline_median,
              "server_over_offline_by_cpu": cpu_ratio}
    print(f"median: offline {offline_median:.1f}, server {server_median:.1f} output tok/s: the server keeps "
          f"{server_median / offline_median:.0%} of offline throughput ({cpu_ratio:.0%} by CPU time per token)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
