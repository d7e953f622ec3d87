"""What one all-reduce of a decode step costs on 2 GPUs, and what a custom one would save.

    PYTHONPATH=. OUT=/tmp/out python scripts/gpu_allreduce_bench.py

A tensor-parallel Llama step all-reduces (tokens, hidden) bf16 twice per layer (64 times for the
8B shape). For 1, 64 and 256 tokens of hidden 4096, each rank times 64 all-reduces back to back:
  nccl-eager   dist.all_reduce launched one by one (what an eager mixed step pays);
  nccl-graph   the same 64 captured in one CUDA graph (what a decode step under graphs pays);
  symm-graph   torch's symmetric-memory one-shot all-reduce (P2P loads, no NVLink multicast),
               in a graph: the figure a custom all-reduce could reach.
Prints and writes $OUT/allreduce.jsonl: microseconds per all-reduce, and the sums checked.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = 4096
TOKENS = (1, 64, 256)
REPEATS = 64  # all-reduces a step of the 8B shape does
ROUNDS = 20


def _time(fn) -> float:
    """Microseconds per all-reduce: the best of ROUNDS runs of `fn` (REPEATS all-reduces)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / REPEATS)
    return best


def _graph(body) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # warm-up outside the graph (NCCL sets up its channels)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    group_name = dist.group.WORLD.group_name
    rows = []
    for tokens in TOKENS:
        x = torch.full((tokens, HIDDEN), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        row = {"tokens": tokens, "hidden": HIDDEN, "bytes": x.numel() * 2}

        def nccl() -> None:
            for _ in range(REPEATS):
                dist.all_reduce(x)

        x.fill_(rank + 1)
        dist.all_reduce(x)
        row["nccl_sum_ok"] = bool((x == sum(range(1, world + 1))).all())
        row["nccl_eager_us"] = round(_time(nccl), 2)
        graph = _graph(nccl)
        row["nccl_graph_us"] = round(_time(graph.replay), 2)
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(buf, group_name)
            buf.fill_(rank + 1)
            y = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group_name)
            torch.cuda.synchronize()
            row["symm_sum_ok"] = bool((y == sum(range(1, world + 1))).all())

            def symm() -> None:
                for _ in range(REPEATS):
                    torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group_name)

            row["symm_eager_us"] = round(_time(symm), 2)
            graph = _graph(symm)
            row["symm_graph_us"] = round(_time(graph.replay), 2)
        except Exception as e:  # noqa: BLE001 - a measurement that is not available says why
            row["symm_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
    rows.append(_check_pagedllm(rank, world))
    if rank == 0:
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(out, "allreduce.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps({"gpu": torch.cuda.get_device_name(), **row}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _check_pagedllm(rank: int, world: int) -> dict:
    """pagedllm's all-reduce (symmetric memory for small tensors) against the exact sums, with the
    input changing at every call (a rank that reuses its buffer too early would corrupt a peer's
    sum), eagerly and replayed from a CUDA graph, at every size class."""
    from pagedllm.distributed.symmetric_all_reduce import SymmetricAllReduce

    small = SymmetricAllReduce.create(dist.group.WORLD)
    if small is None:
        return {"check": "pagedllm all-reduce", "skipped": "symmetric memory unavailable"}
    bad = 0
    for tokens in (1, 7, 64, 256):
        xs = [torch.full((tokens, HIDDEN), float((i % 7) + rank + 1), dtype=torch.bfloat16, device="cuda") for i in range(REPEATS)]
        outs: list[torch.Tensor] = []

        def body() -> None:
            outs.clear()
            for x in xs:
                outs.append(small(x * 1))  # a fresh input each call, as a layer's output is

        expected = [float(2 * (i % 7) + 2 + world - 1) for i in range(REPEATS)]  # (i%7+1) + (i%7+2) for 2 ranks
        for _ in range(3):
            body()
            torch.cuda.synchronize()
            bad += sum(int((o != e).any()) for o, e in zip(outs, expected))
        graph = _graph(body)
        for _ in range(10):
            graph.replay()
            torch.cuda.synchronize()
            bad += sum(int((o != e).any()) for o, e in zip(outs, expected))
    return {"check": "pagedllm all-reduce, changing inputs, eager and graph", "wrong_sums": bad, "pass": bad == 0}


def main() -> int:
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    world = torch.cuda.device_count()
    if world < 2:
        print("needs 2 GPUs", file=sys.stderr)
        return 1
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, out), nprocs=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
