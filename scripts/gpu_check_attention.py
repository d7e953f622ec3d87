"""Check the Triton attention backend against the torch one on a GPU, then time it.

    PYTHONPATH=. python scripts/gpu_check_attention.py            # checks + timings
    PYTHONPATH=. python scripts/gpu_check_attention.py --sweep    # also tile / partition sweeps

Checks: bf16 and fp32, head dims 64 and 128, block sizes 16 and 32, contexts 1..8192,
decodes + prefill chunks (whole prompts and chunks continuing a cached prefix) in one
step, GQA. The reference is the torch backend run in fp32 on the same (upcast) inputs;
the torch backend in the test dtype is printed beside it as the yardstick. Then a CUDA
graph of a decode step, captured at one set of contexts and replayed at another.

Timings (JSON lines, microseconds, median of CUDA-event timed runs): decode at batch
1/64/256, context 1024, 32 q / 8 kv heads, D=128, bf16, eager and graph-replayed, with
the bytes of K/V read per microsecond against the copy bandwidth; prefill likewise
against torch SDPA (flash) on contiguous tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from pagedllm.attention import triton_kernels as kernels
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import TorchAttentionBackend
from pagedllm.attention.triton_backend import TritonAttentionBackend

DEVICE = "cuda"
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def build_step(seqs, num_decodes, block_size, num_kv_heads, head_dim, dtype, max_seq_len=None, gen=None,
               device=DEVICE):
    """(meta, k_cache, v_cache, key, value) for seqs = [(context after the step, new tokens)].

    Pages are a random permutation, the cached prefixes random, the block table as wide
    as max_seq_len (a CUDA graph's bound) so steps of one batch size share shapes.
    """
    max_seq_len = max_seq_len or max(ctx for ctx, _ in seqs)
    max_blocks = -(-max_seq_len // block_size)
    num_blocks = len(seqs) * max_blocks + 1
    pages = torch.randperm(num_blocks, generator=gen, device=device)[: len(seqs) * max_blocks]
    block_tables = pages.view(len(seqs), max_blocks).to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)

    slots, starts = [], [0]
    for i, (ctx, new) in enumerate(seqs):
        pos = torch.arange(ctx - new, ctx, device=device)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
        starts.append(starts[-1] + new)
    key = torch.randn(starts[-1], num_kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    value = torch.randn(key.shape, generator=gen, device=device, dtype=dtype)
    seq_lens = [ctx for ctx, _ in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max_seq_len,
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return meta, k_cache, v_cache, key, value


def reference(query, key, value, k_cache, v_cache, meta, scale):
    """The torch backend in fp32 on upcast copies (the caches are left as they are)."""
    up = [t.float() for t in (query, key, value, k_cache, v_cache)]
    return TorchAttentionBackend().forward(*up, meta, scale)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def report(case: dict, err: float, tol: float, **extra) -> bool:
    ok = err == err and err <= tol  # NaN fails
    print(json.dumps({"check": case, "max_abs_err": f"{err:.2e}", "tol": tol, **extra,
                      "result": "PASS" if ok else "FAIL"}))
    return ok


def check_step(seqs, num_decodes, dtype, head_dim, block_size, num_heads, num_kv_heads, gen) -> bool:
    meta, k_cache, v_cache, key, value = build_step(seqs, num_decodes, block_size, num_kv_heads, head_dim, dtype,
                                                    gen=gen)
    query = torch.randn(key.shape[0], num_heads, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    scale = head_dim**-0.5
    k_torch, v_torch = k_cache.clone(), v_cache.clone()
    peer = TorchAttentionBackend().forward(query, key, value, k_torch, v_torch, meta, scale)
    got = TritonAttentionBackend().forward(query, key, value, k_cache, v_cache, meta, scale)
    want = reference(query, key, value, k_cache, v_cache, meta, scale)
    same_cache = torch.equal(k_cache, k_torch) and torch.equal(v_cache, v_torch)
    case = {"dtype": str(dtype).split(".")[-1], "D": head_dim, "block": block_size, "heads": f"{num_heads}/{num_kv_heads}",
            "decodes": num_decodes, "seqs": len(seqs), "max_ctx": meta.max_seq_len}
    err = max_err(got, want) if same_cache else float("nan")
    return report(case, err, TOLERANCE[dtype], torch_backend_err=f"{max_err(peer, want):.2e}", cache_ok=same_cache)


def check_padding_and_graph(dtype, gen) -> bool:
    """Capture a decode step (with a padding sequence: seq_len 0, slot -1) in a CUDA graph at
    one set of contexts, replay at another: the real rows match, the padding row is 0."""
    bound, block_size, heads, kv_heads, d = 4096, 16, 32, 8, 128
    backend, scale = TritonAttentionBackend(), d**-0.5

    def step(contexts, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        meta, kc, vc, key, value = build_step([(c, 1) for c in contexts], len(contexts), block_size, kv_heads, d,
                                              dtype, max_seq_len=bound, gen=g)
        query = torch.randn(len(contexts), heads, d, generator=g, device=DEVICE, dtype=dtype)
        return meta, kc, vc, key, value, query

    meta, kc, vc, key, value, query = step([5, 4096, 700, 1], seed=1)
    meta.seq_lens[-1] = 0  # the padding sequence of the captured batch
    meta.slot_mapping[-1] = -1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.forward(query, key, value, kc, vc, meta, scale)  # warm-up compiles outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(query, key, value, kc, vc, meta, scale)

    meta2, kc2, vc2, key2, value2, query2 = step([3000, 17, 1024, 1], seed=2)
    for static, new in [(meta.seq_lens, meta2.seq_lens), (meta.block_tables, meta2.block_tables),
                        (meta.slot_mapping, meta2.slot_mapping), (kc, kc2), (vc, vc2), (key, key2),
                        (value, value2), (query, query2)]:
        static.copy_(new)
    meta.seq_lens[-1] = 0
    meta.slot_mapping[-1] = -1
    graph.replay()
    real = slice(0, 3)
    meta2_real = build_meta_prefix(meta2, 3)
    want = reference(query2[real], key2[real], value2[real], kc2, vc2, meta2_real, scale)
    err = max_err(out[real], want)
    pad_zero = bool((out[-1] == 0).all())
    return report({"cuda_graph_decode": str(dtype).split(".")[-1], "bound": bound}, err if pad_zero else float("nan"),
                  TOLERANCE[dtype], padding_row_zero=pad_zero)


def build_meta_prefix(meta: AttentionMetadata, n: int) -> AttentionMetadata:
    """The first n decode sequences of a decode-only step."""
    return AttentionMetadata(meta.slot_mapping[:n], meta.query_start_loc[: n + 1], meta.seq_lens[:n],
                             meta.block_tables[:n], n, n, 1, max(meta.seq_lens_cpu[:n]),
                             meta.query_start_loc_cpu[: n + 1], meta.seq_lens_cpu[:n])


def run_checks() -> bool:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # decodes at 1, on / past block boundaries, long; prompts; chunks continuing a prefix
    mixed = [(1, 1), (16, 1), (33, 1), (1000, 1), (8192, 1),
             (1, 1), (31, 31), (300, 300), (2048, 2048), (4097, 129), (8192, 512)]
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            for block_size in (16, 32):
                for heads, kv_heads in ((32, 8), (12, 4), (8, 8)):
                    ok &= check_step(mixed, 5, dtype, head_dim, block_size, heads, kv_heads, gen)
        ok &= check_step([(c, 1) for c in (1, 2, 17, 64, 8191, 8192)], 6, dtype, 128, 16, 32, 8, gen)
        ok &= check_step([(c, c) for c in (1, 5, 128, 1000)], 0, dtype, 96, 16, 12, 4, gen)  # padded head dim
        ok &= check_padding_and_graph(dtype, gen)
    return ok


# ---------------------------------------------------------------------------- timing


def time_us(fn, reps: int = 50, graph: bool = False) -> float:
    """Median microseconds of fn, by CUDA events; graph=True times replays of a captured fn."""
    for _ in range(10):  # compile, and bring the clocks up
        fn()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    times = []
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read + written per second: the memory ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_us(lambda: dst.copy_(src), reps=20) / 1e3


def bench_decode(batch, ctx, ceiling_gbs, heads=32, kv_heads=8, d=128, block_size=16, **kernel_args):
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    dtype = torch.bfloat16
    meta, kc, vc, key, value = build_step([(ctx, 1)] * batch, batch, block_size, kv_heads, d, dtype, gen=gen)
    query = torch.randn(batch, heads, d, generator=gen, device=DEVICE, dtype=dtype)
    out = torch.empty_like(query)
    scale = d**-0.5

    def triton_decode():
        kernels.decode_attention(out, query, kc, vc, meta.block_tables, meta.seq_lens, scale, ctx, **kernel_args)

    def torch_decode():
        TorchAttentionBackend._decode(query, kc, vc, meta, scale)

    kv_bytes = 2 * batch * ctx * kv_heads * d * dtype.itemsize
    eager, graphed = time_us(triton_decode), time_us(triton_decode, graph=True)
    row = {"bench": "decode", "batch": batch, "ctx": ctx, "heads": f"{heads}/{kv_heads}", "D": d, "dtype": "bf16",
           "block": block_size, **kernel_args, "triton_us": round(eager, 1), "triton_graph_us": round(graphed, 1),
           "kv_GBps": round(kv_bytes / graphed / 1e3), "pct_of_copy_bw": round(100 * kv_bytes / graphed / 1e3 / ceiling_gbs, 1)}
    if not kernel_args:
        row["torch_backend_us"] = round(time_us(torch_decode, reps=10), 1)
    print(json.dumps(row))


def bench_prefill(batch, q_len, ctx, heads=32, kv_heads=8, d=128, block_size=16, **kernel_args):
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    dtype = torch.bfloat16
    meta, kc, vc, key, value = build_step([(ctx, q_len)] * batch, 0, block_size, kv_heads, d, dtype, gen=gen)
    query = torch.randn(batch * q_len, heads, d, generator=gen, device=DEVICE, dtype=dtype)
    out = torch.empty_like(query)
    scale = d**-0.5

    def triton_prefill():
        kernels.prefill_attention(out, query, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                                  0, batch, q_len, **kernel_args)

    us = time_us(triton_prefill)
    # multiply-adds of QK^T and PV over the causal part: q_len queries, ctx - q_len + (i+1) keys each
    keys_seen = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
    flops = 4 * batch * heads * d * keys_seen
    row = {"bench": "prefill", "batch": batch, "q_len": q_len, "ctx": ctx, "heads": f"{heads}/{kv_heads}", "D": d,
           "dtype": "bf16", "block": block_size, **kernel_args, "triton_us": round(us, 1),
           "triton_TFLOPs": round(flops / us / 1e6, 1)}
    if q_len == ctx and not kernel_args:  # peer: flash SDPA on contiguous tensors, same work
        q = torch.randn(batch, heads, q_len, d, device=DEVICE, dtype=dtype)
        k = torch.randn(batch, kv_heads, q_len, d, device=DEVICE, dtype=dtype)
        sdpa_us = time_us(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True))
        row["sdpa_flash_us"] = round(sdpa_us, 1)
        row["sdpa_TFLOPs"] = round(flops / sdpa_us / 1e6, 1)
    print(json.dumps(row))


def run_timings(sweep: bool) -> None:
    ceiling = copy_bandwidth_gbs()
    print(json.dumps({"copy_bandwidth_GBps": round(ceiling)}))
    for batch in (1, 64, 256):
        bench_decode(batch, 1024, ceiling)
    bench_decode(1, 8192, ceiling)
    for batch, q_len, ctx in ((1, 2048, 2048), (4, 2048, 2048), (1, 8192, 8192), (8, 512, 4096)):
        bench_prefill(batch, q_len, ctx)
    if not sweep:
        return
    for batch in (1, 64, 256):
        for num_partitions in (1, 2, 4, 8, 16):
            for block_n in (32, 64, 128):
                bench_decode(batch, 1024, ceiling, num_partitions=num_partitions, block_n=block_n)
    for d in (64, 128):
        for block_m in (64, 128):
            for block_n in (32, 64, 128):
                for num_warps in (4, 8):
                    for num_stages in (2, 3):
                        bench_prefill(4, 2048, 2048, d=d, block_m=block_m, block_n=block_n, num_warps=num_warps,
                                      num_stages=num_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also sweep tile sizes and partitions")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    ok = run_checks()
    print(json.dumps({"all_checks": "PASS" if ok else "FAIL"}))
    if not args.no_timing:
        run_timings(args.sweep)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
