"""`pagedllm bench serve`: a load generator for a running OpenAI-compatible server.

    pagedllm bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --random-input-len 128 --random-output-len 64 --max-concurrency 8 --request-rate inf

Streams every request (/v1/completions, stream_options.include_usage) and reports time
to first token (TTFT), time per output token after the first (TPOT), the gaps between
streamed chunks (ITL), request and token throughput, and failures; --output-json writes
the same figures as JSON. Prompts are random token ids of the given length (exact
input lengths, EOS ignored so every request produces its output length) or the prompts
of a JSONL file.

One client process reads about 20,000 streamed tokens/s at most (measured against a
data-parallel server on 2 H200s, docs/benchmarks.md): past that the figure is the
client's, not the server's. --client-processes N splits the requests (and the request
rate and concurrency) over N processes that start together; the figures are over all
of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default: http://127.0.0.1:8000)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="API key, if the server wants one (default: none)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    parser.add_argument("--request-rate", default="inf",
                        help="requests per second, Poisson arrivals; inf = all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="send from this many processes at once, the requests split between them (default: 1)")
    parser.add_argument("--dataset", default="random", help="random, or a JSONL file of {\"prompt\": ...} lines (default: random)")
    parser.add_argument("--random-input-len", type=int, default=128, help="random dataset: prompt tokens (default: 128)")
    parser.add_argument("--random-output-len", type=int, default=128,
                        help="output tokens per request (random dataset, and JSONL lines without max_tokens) (default: 128)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="random dataset: token ids are drawn from [1000, this); every common vocabulary is larger (default: 32000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of prompts and arrivals (default: 0)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    parser.add_argument("--output-json", default=None, help="also write the results as JSON to this file (default: none)")


def load_requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        # Ids above the first 1000 skip most special tokens of common vocabularies.
        low = min(1000, vocab_size // 2)
        return [
            BenchRequest([rng.randrange(low, vocab_size) for _ in range(args.random_input_len)], args.random_output_len)
            for _ in range(args.num_prompts)
        ]
    with open(args.dataset) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"{args.dataset} holds no prompts: write one JSON object per line, e.g. {{\"prompt\": \"Hello\"}}")
    return [
        BenchRequest(line["prompt"], int(line.get("max_tokens", args.random_output_len)))
        for line in (lines[i % len(lines)] for i in range(args.num_prompts))
    ]


async def send_one(client: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestResult:
    body = {
        "model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(choice.get("text") for choice in chunk["choices"]):
                    continue
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.chunk_gaps.append(now - last)
                last = now
        result.latency = last - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "the stream ended without a usage chunk"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


# httpx's pool, on every request it adds or ends, walks all its connections once per idle one:
# a burst's hundreds of idle keep-alive connections, kept open by the server (pagedllm's for
# 75 s), cost this process tens of seconds of CPU per run (1,024 requests on the 2-core CPU:
# 41 s instead of 13). Past this many connections in all, one that falls idle is closed.
MAX_KEEPALIVE_CONNECTIONS = 100  # the openai SDK's


def _client(args: argparse.Namespace) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    max_connections = args.max_concurrency or 1000
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(max_connections, MAX_KEEPALIVE_CONNECTIONS))
    return httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(args.timeout, connect=30.0))


async def send_all(args: argparse.Namespace, model: str, requests: list[BenchRequest], rate: float,
                   concurrency: int | None, seed: int) -> tuple[float, float, list[RequestResult]]:
    """Send `requests` at `rate` per second (Poisson), at most `concurrency` at once:
    (start, end) on the monotonic clock (one clock for every process) and the results."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    async with _client(args) as client:

        async def limited(request: BenchRequest) -> RequestResult:
            if semaphore is None:
                return await send_one(client, model, request)
            async with semaphore:
                return await send_one(client, model, request)

        start = time.monotonic()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return start, time.monotonic(), results


def _client_process(args: argparse.Namespace, model: str, share: list[BenchRequest], index: int,
                    ready: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:
    n = args.client_processes
    concurrency = -(-args.max_concurrency // n) if args.max_concurrency else None
    ready.wait()  # every process is up: all start sending together
    results.put(asyncio.run(send_all(args, model, share, float(args.request_rate) / n, concurrency, args.seed + 1 + index)))


def send_from_processes(args: argparse.Namespace, model: str, requests: list[BenchRequest]) -> tuple[float, list[RequestResult]]:
    """The requests dealt round-robin to --client-processes processes: (wall time over all, results)."""
    context = multiprocessing.get_context("spawn")
    n = args.client_processes
    ready, queue = context.Barrier(n + 1), context.Queue()
    processes = [context.Process(target=_client_process, args=(args, model, requests[i::n], i, ready, queue), daemon=True)
                 for i in range(n)]
    for process in processes:
        process.start()
    ready.wait(timeout=120)
    shares = [queue.get(timeout=args.timeout + 120) for _ in processes]
    for process in processes:
        process.join()
    start, end = min(s[0] for s in shares), max(s[1] for s in shares)
    return end - start, [r for share in shares for r in share[2]]


async def first_request(args: argparse.Namespace, request: BenchRequest) -> str:
    """The model to send (--model, or the server's first); one short request first, as vLLM's bench
    does, so a broken setup fails at once."""
    async with _client(args) as client:
        model = args.model or (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        warmup = await send_one(client, model, BenchRequest(request.prompt, min(request.output_len, 4)))
    if not warmup.ok:
        raise SystemExit(f"the first test request failed: {warmup.error}")
    return model


def run(args: argparse.Namespace) -> dict:
    if args.client_processes < 1:
        raise SystemExit("--client-processes must be at least 1")
    requests = load_requests(args, args.vocab_size)
    model = asyncio.run(first_request(args, requests[0]))
    if args.client_processes == 1:
        start, end, results = asyncio.run(send_all(args, model, requests, float(args.request_rate), args.max_concurrency, args.seed + 1))
        duration = end - start
    else:
        duration, results = send_from_processes(args, model, requests)
    return summarize(args, model, results, duration)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * scale

    return {"mean": statistics.fmean(values) * scale, "p50": pct(50), "p99": pct(99)}


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    failures = [r.error for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "model": model,
        "base_url": args.base_url,
        "num_prompts": len(results),
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "client_processes": args.client_processes,
        "dataset": args.dataset,
        "input_len": args.random_input_len if args.dataset == "random" else None,
        "output_len": args.random_output_len if args.dataset == "random" else None,
        "completed": len(ok),
        "failed": len(failures),
        "errors": sorted(set(failures))[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats([gap for r in ok for gap in r.chunk_gaps]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
    }


def print_report(result: dict) -> None:
    print(f"============ Serving benchmark: {result['model']} at {result['base_url']} ============")
    print(f"requests: {result['completed']} completed, {result['failed']} failed, in {result['duration_s']:.2f} s "
          f"(rate {result['request_rate']}, concurrency {result['max_concurrency'] or 'unlimited'}, "
          f"{result['client_processes']} client process{'es' if result['client_processes'] > 1 else ''})")
    for error in result["errors"]:
        print(f"  error: {error}")
    print(f"request throughput:      {result['request_throughput']:.3f} req/s")
    print(f"output token throughput: {result['output_token_throughput']:.2f} tok/s")
    print(f"total token throughput:  {result['total_token_throughput']:.2f} tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        s = result[name]
        if s["mean"] is not None:
            print(f"{name[:-3].upper():>12} ms: mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p99 {s['p99']:9.2f}")


def main(args: argparse.Namespace) -> dict:
    result = run(args)
    print_report(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    if result["completed"] == 0:
        sys.exit(1)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pagedllm.benchmarks.serve", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args())
