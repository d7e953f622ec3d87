"""The fused all-reduce + residual add + RMSNorm on 2 GPUs: equal to the unfused path, and what
a layer boundary costs each way. One process per GPU.

    PYTHONPATH=. OUT=/tmp/out python scripts/gpu_all_reduce_norm_check.py

For (tokens, 4096) bf16 at 8192, 2048, 256, 64 and 1 tokens (the largest first: the first call
sizes the inboxes), a chain of 64 boundaries as a step has (each boundary's output feeds the
next one's input and residual, so a rank that read a peer's buffer too early or too late would
corrupt the chain):
  unfused  the all-reduce the model would take (TensorParallelGroup.all_reduce: torch's one-shot
           over symmetric memory up to 2 MB, NCCL above), then layers/triton_ops.rms_norm
  fused    SymmetricAllReduce.add_rms_norm, halves alternating as the model links them
Checked: the fused outputs equal the unfused ones bit for bit, eagerly and over 50 replays of a
CUDA graph with fresh inputs each time, and both ranks hold the same residual stream. Timed:
µs per boundary inside a graph (best of 20). Prints and writes $OUT/all_reduce_norm.jsonl.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gpu_allreduce_bench import _graph  # (scripts/ is on the path: run as python scripts/...)

HIDDEN = 4096
BOUNDARIES = 64
EPS = 1e-5


def _chain(step, partials: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    """BOUNDARIES boundaries: boundary i sums partials[i] scaled by the previous output."""
    out = None
    for i, partial in enumerate(partials):
        x = partial.clone() if out is None else partial * out  # fresh (NCCL sums in place), and dependent on the last boundary
        out, residual = step(x, residual, i % 2)
    return torch.cat([out, residual])


def _best_us(graph: torch.cuda.CUDAGraph) -> float:
    best = float("inf")
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / BOUNDARIES)
    return best


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    from pagedllm.distributed import TensorParallelGroup
    from pagedllm.distributed.symmetric_all_reduce import SymmetricAllReduce
    from pagedllm.layers import triton_ops

    small = SymmetricAllReduce.create(dist.group.WORLD)
    assert small is not None, "symmetric memory unavailable"
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=torch.Generator("cuda").manual_seed(1), device="cuda")).bfloat16()

    tp = TensorParallelGroup(rank, world, dist.group.WORLD, small)

    def unfused(x, residual, half):
        return triton_ops.rms_norm(tp.all_reduce(x), weight, EPS, residual)

    def fused(x, residual, half):
        result = small.add_rms_norm(x, residual, weight, EPS, half)
        assert result is not None
        return result

    rows = []
    for tokens in (8192, 2048, 256, 64, 1):
        gen = torch.Generator("cuda").manual_seed(100 + rank)  # each rank its own partial sums
        partials = [torch.randn(tokens, HIDDEN, generator=gen, device="cuda").bfloat16() for _ in range(BOUNDARIES)]
        residual = torch.randn(tokens, HIDDEN, generator=torch.Generator("cuda").manual_seed(7), device="cuda").bfloat16()
        row = {"gpu": torch.cuda.get_device_name(), "tokens": tokens, "hidden": HIDDEN, "boundaries": BOUNDARIES}
        want = _chain(unfused, partials, residual)
        got = _chain(fused, partials, residual)
        row["eager_equal"] = bool(torch.equal(want, got))
        results: dict[str, torch.Tensor] = {}
        graphs = {name: _graph(lambda name=name, step=step: results.__setitem__(name, _chain(step, partials, residual)))
                  for name, step in (("unfused", unfused), ("fused", fused))}
        mismatches = 0
        for replay in range(50):
            for p in partials:  # fresh inputs, the same on both paths
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda").bfloat16())
            graphs["unfused"].replay()
            graphs["fused"].replay()
            torch.cuda.synchronize()
            mismatches += int(not torch.equal(results["unfused"], results["fused"]))
        row["graph_replays_unequal"] = mismatches
        stream_sum = results["fused"].float().sum().reshape(1)
        gathered = [torch.empty_like(stream_sum) for _ in range(world)]
        dist.all_gather(gathered, stream_sum)
        row["ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
        for name, graph in graphs.items():
            row[f"{name}_graph_us"] = round(_best_us(graph), 2)
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
    if rank == 0:
        with open(os.path.join(out_dir, "all_reduce_norm.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        ok = all(r["eager_equal"] and not r["graph_replays_unequal"] and r["ranks_agree"] for r in rows)
        print("PASS" if ok else "FAIL", "fused all-reduce + add + RMSNorm equals the unfused path", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    world = 2
    if torch.cuda.device_count() < world:
        print(f"needs {world} GPUs, found {torch.cuda.device_count()}")
        return 1
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    from pagedllm.benchmarks.server_process import free_port

    mp.spawn(_rank, args=(world, free_port(), out_dir), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
