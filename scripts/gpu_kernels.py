"""Check every Triton kernel against the torch code it replaces on the GPU, then time them.

    PYTHONPATH=. python scripts/gpu_kernels.py                    # checks, then timings
    PYTHONPATH=. python scripts/gpu_kernels.py --sweep --models llama-8b   # also tile / partition sweeps
    PYTHONPATH=. python scripts/gpu_kernels.py --interpret-smoke  # CPU, TRITON_INTERPRET=1, tiny shapes

Shapes are those of the benchmark models (smollm2-135m, llama-1b, llama-8b; with Llama 3
rope scaling for the Llama shapes), dtypes bf16 and fp32. Checks:
  - fused RMSNorm (plain, + residual, over the heads of a qkv slice), rotary in place on q/k
    views of a qkv buffer, SiLU-and-mul, GELU-tanh-and-mul: the kernel against the layer's
    own torch path (PAGEDLLM_FUSED_KERNELS=0) in the same dtype;
  - that the layers dispatch to the kernels on CUDA;
  - the attention backend (decode split-K + varlen prefill) against the torch backend in fp32,
    at each model's heads / kv heads / head dim, decodes with a graph-style context bound;
  - a few decoder layers of each model, fused on against off (fp32: equal to 1e-3).
Timings (median of CUDA-event timed runs, microseconds): each fused kernel against the torch
ops it replaces at decode (64 tokens) and prefill (4096 tokens) sizes; the layer stack's
decode step (batch 64, context 512) fused on / off, eager and CUDA-graph replayed; prefill
attention against torch SDPA (flash) on the same work; decode attention at batch 1/64/256
with the context bound of the step and of a graph captured at max_model_len 131072.

Every row is printed and appended as a JSON line to $OUT/kernels.jsonl (or ./kernels.jsonl).
The exit status is 1 when a check fails. --interpret-smoke runs the same code on tiny shapes
in fp32 and fp16 (the interpreter rounds to bf16 by truncation) to prove the script runs.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--interpret-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check_attention as attn_check  # noqa: E402

from pagedllm.attention import triton_kernels  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedllm.benchmarks.workloads import MODEL_CONFIGS  # noqa: E402
from pagedllm.layers import fused, triton_ops  # noqa: E402
from pagedllm.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
HALF = torch.float16 if SMOKE else torch.bfloat16
DTYPES = (torch.float32, HALF)
# |got - want| <= atol + rtol |want|: two ulps of the half type (rounding points agree, fp32 sums may not)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
ATTENTION_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ROWS: list[dict] = []


def llama3_scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def shapes(names: list[str]) -> dict[str, dict]:
    if SMOKE:  # non-power-of-2 hidden, GQA 3, a head dim that still makes 16-wide dots
        return {"tiny": dict(hidden=96, ffn=40, heads=6, kv_heads=2, head_dim=32, theta=10000.0, scaling=None,
                             layers=2, max_pos=256)}
    out = {}
    for name, c in MODEL_CONFIGS.items():
        out[name] = dict(hidden=c["hidden_size"], ffn=c["intermediate_size"], heads=c["num_attention_heads"],
                         kv_heads=c["num_key_value_heads"], head_dim=c["hidden_size"] // c["num_attention_heads"],
                         theta=c["rope_theta"], scaling=None if name.startswith("smollm2") else llama3_scaling(8.0),
                         layers=4, max_pos=c["max_position_embeddings"])
    unknown = set(names) - set(out)
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}: choose from {', '.join(out)}")
    return {name: out[name] for name in names}


JSONL = os.path.join(os.environ.get("OUT", "."), "kernels.jsonl")


def emit(row: dict) -> None:
    """Print the row and append it to JSONL at once, so a crash later keeps what came before."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(JSONL, "a") as f:
        f.write(json.dumps(row) + "\n")


def guarded(what: str, fn, *args) -> bool:
    """fn(*args); an exception becomes a FAIL row and the script goes on with the next piece."""
    try:
        return fn(*args) is not False
    except Exception as e:  # noqa: BLE001 (one broken kernel must not hide the others' figures)
        emit({"kind": "check", "kernel": what, "error": f"{type(e).__name__}: {e}"[:2000], "result": "FAIL"})
        return False


@contextlib.contextmanager
def fused_kernels(on: bool):
    """The layers' dispatch (layers/fused.py) switched on or off for the block."""
    old = os.environ.get("PAGEDLLM_FUSED_KERNELS")
    os.environ["PAGEDLLM_FUSED_KERNELS"] = "1" if on else "0"
    fused.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PAGEDLLM_FUSED_KERNELS")
        else:
            os.environ["PAGEDLLM_FUSED_KERNELS"] = old
        fused.reset()


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- checks


def check(kernel: str, model: str, dtype, got, want, **extra) -> bool:
    atol, rtol = TOLERANCE[dtype]
    got, want = [t if isinstance(t, tuple) else (t,) for t in (got, want)]
    err = max((g.float() - w.float()).abs().max().item() if g.numel() else 0.0 for g, w in zip(got, want))
    ok = all(g.shape == w.shape and bool(((g.float() - w.float()).abs() <= atol + rtol * w.float().abs()).all())
             for g, w in zip(got, want))
    emit({"kind": "check", "kernel": kernel, "model": model, "dtype": dname(dtype), **extra,
          "max_abs_err": float(f"{err:.3g}"), "result": "PASS" if ok else "FAIL"})
    return ok


def check_elementwise(model: str, s: dict, dtype, num_tokens: int) -> bool:
    ok = True
    hidden, D = s["hidden"], s["head_dim"]
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    head_norm = RMSNorm(D, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, dtype=dtype) + 1)
        head_norm.weight.copy_(randn(D, dtype=dtype) + 1)
    x, residual = randn(num_tokens, hidden, dtype=dtype), randn(num_tokens, hidden, dtype=dtype, scale=4.0)
    q_size, kv_size = s["heads"] * D, s["kv_heads"] * D
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k = qkv[:, :q_size].view(-1, s["heads"], D), qkv[:, q_size:q_size + kv_size].view(-1, s["kv_heads"], D)
    rotary = RotaryEmbedding(D, s["max_pos"], s["theta"], s["scaling"]).to(DEVICE)
    positions = torch.randint(0, s["max_pos"], (num_tokens,), device=DEVICE)
    gate_up = randn(num_tokens, 2 * s["ffn"], dtype=dtype, scale=3.0)
    case = dict(tokens=num_tokens)
    with fused_kernels(False):  # the torch code of each layer, on the same device
        want_norm, want_add = norm(x), norm(x, residual)
        want_heads = head_norm(q)
        want_rot = rotary(positions, q.clone(), k.clone())
        want_silu, want_gelu = SiluAndMul()(gate_up), GeluAndMul()(gate_up)
    ok &= check("rms_norm", model, dtype, triton_ops.rms_norm(x, norm.weight, norm.eps), want_norm, **case)
    ok &= check("rms_norm+residual", model, dtype, triton_ops.rms_norm(x, norm.weight, norm.eps, residual), want_add,
                **case)
    ok &= check("rms_norm(q heads)", model, dtype, triton_ops.rms_norm(q, head_norm.weight, head_norm.eps),
                want_heads, **case)
    ok &= check("rotary_inplace", model, dtype, triton_ops.rotary_inplace_(positions, q, k, rotary.cos_sin),
                want_rot, **case)
    ok &= check("silu_and_mul", model, dtype, triton_ops.silu_and_mul(gate_up), want_silu, **case)
    ok &= check("gelu_tanh_and_mul", model, dtype, triton_ops.gelu_tanh_and_mul(gate_up), want_gelu, **case)
    return ok


def check_dispatch() -> bool:
    """On CUDA the layers take the Triton kernels (unless switched off); on the CPU never those:
    float32 takes pagedllm's C kernels where they run (layers/cpu_ops.py)."""
    from pagedllm.layers import cpu_kernels, cpu_ops

    x = torch.zeros(2, 8, device=DEVICE)
    with fused_kernels(True):
        on = fused.fused_ops_for(x)
    with fused_kernels(False):
        off = fused.fused_ops_for(x)
    want = triton_ops if DEVICE == "cuda" else (cpu_ops if cpu_kernels.lib() is not None else None)
    ok = off is None and on is want
    emit({"kind": "check", "kernel": "layer dispatch", "device": DEVICE, "fused_on": on is not None,
          "fused_off": off is not None, "result": "PASS" if ok else "FAIL"})
    return ok


def check_attention(model: str, s: dict, dtype) -> bool:
    """Decodes (graph-style bound far above the contexts) and prefill chunks at the model's heads."""
    if SMOKE:
        seqs, nd, bound = [(1, 1), (17, 1), (300, 1), (20, 20), (37, 5), (70, 70)], 3, 1024
    else:
        seqs = [(1, 1), (33, 1), (1000, 1), (4097, 1), (1, 1), (300, 300), (2048, 2048), (4097, 129)]
        nd, bound = 4, 131072
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    meta, kc, vc, key, value = attn_check.build_step(seqs, nd, 16, s["kv_heads"], s["head_dim"], dtype, gen=gen,
                                                     device=DEVICE)
    meta.max_seq_len = bound  # as a CUDA graph captured at max_model_len passes it
    query = torch.randn(key.shape[0], s["heads"], s["head_dim"], generator=gen, device=DEVICE).to(dtype)
    scale = s["head_dim"] ** -0.5
    got = TritonAttentionBackend().forward(query, key, value, kc, vc, meta, scale)
    want = attn_check.reference(query, key, value, kc, vc, meta, scale)
    err = (got.float() - want).abs().max().item()
    ok = err == err and err <= ATTENTION_TOLERANCE[dtype]
    emit({"kind": "check", "kernel": "attention (decode + prefill)", "model": model, "dtype": dname(dtype),
          "heads": f"{s['heads']}/{s['kv_heads']}x{s['head_dim']}", "max_abs_err": float(f"{err:.3g}"),
          "result": "PASS" if ok else "FAIL"})
    return ok


# ---------------------------------------------------------------------------- a few decoder layers


def build_layers(s: dict, dtype, batch: int, ctx: int):
    """A Llama model of s['layers'] layers with random weights, its caches bound, and a decode
    step of `batch` sequences at context `ctx`: (model, input_ids, positions, meta)."""
    from transformers import LlamaConfig

    from pagedllm.layers.attention import bind_kv_cache
    from pagedllm.loader.model_loader import _init_dummy_weights, _no_init
    from pagedllm.models.llama import LlamaForCausalLM

    # (rope scaling only changes the cos/sin table, which check_elementwise covers)
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], num_hidden_layers=s["layers"], vocab_size=1024,
                         max_position_embeddings=s["max_pos"], rope_theta=s["theta"])
    with _no_init(DEVICE, dtype):  # as the loader builds it: the rotary table stays fp32
        model = LlamaForCausalLM(config).eval().requires_grad_(False)
    _init_dummy_weights(model, 0)
    with torch.no_grad():  # norm scales 1 would hide a wrong weight index: make them vary
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    meta, kc, vc, _, _ = attn_check.build_step([(ctx, 1)] * batch, batch, 16, s["kv_heads"], s["head_dim"], dtype,
                                               device=DEVICE)
    caches = [(kc.clone(), vc.clone()) for _ in range(s["layers"])]
    bind_kv_cache(model, caches, TritonAttentionBackend())
    input_ids = torch.randint(0, 1024, (batch,), device=DEVICE)
    positions = torch.full((batch,), ctx - 1, device=DEVICE)
    return model, input_ids, positions, meta


def check_layers(model_name: str, s: dict) -> bool:
    """fp32 decoder layers with the kernels on and off: the same hidden states."""
    model, ids, pos, meta = build_layers(s, torch.float32, 4, 40)
    with torch.inference_mode():
        with fused_kernels(False):
            want = model(ids, pos, meta)
        with fused_kernels(True):
            got = model(ids, pos, meta)
    err = (got - want).abs().max().item()
    ok = err <= 1e-3 * max(1.0, want.abs().max().item())
    emit({"kind": "check", "kernel": f"{s['layers']} decoder layers, fused on vs off", "model": model_name,
          "dtype": "float32", "max_abs_err": float(f"{err:.3g}"), "result": "PASS" if ok else "FAIL"})
    return ok


# ---------------------------------------------------------------------------- timing


def time_us(fn, graph: bool = False) -> float:
    if SMOKE:  # the interpreter: one run proves the path, its time means nothing
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return attn_check.time_us(fn, reps=30, graph=graph)


def bench_pair(kernel: str, model: str, tokens: int, fused_fn, torch_fn, nbytes: int) -> None:
    fused_us, torch_us = time_us(fused_fn), time_us(torch_fn)
    emit({"kind": "bench", "kernel": kernel, "model": model, "dtype": dname(HALF), "tokens": tokens,
          "fused_us": round(fused_us, 1), "torch_us": round(torch_us, 1), "speedup": round(torch_us / fused_us, 2),
          "fused_GBps": round(nbytes / fused_us / 1e3)})


def bench_elementwise(model: str, s: dict, tokens: int) -> None:
    dtype, es = HALF, HALF.itemsize
    hidden, D = s["hidden"], s["head_dim"]
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    x, residual = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype)
    q_size, kv_size = s["heads"] * D, s["kv_heads"] * D
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k = qkv[:, :q_size].view(-1, s["heads"], D), qkv[:, q_size:q_size + kv_size].view(-1, s["kv_heads"], D)
    rotary = RotaryEmbedding(D, s["max_pos"], s["theta"], s["scaling"]).to(DEVICE)
    positions = torch.randint(0, s["max_pos"], (tokens,), device=DEVICE)
    gate_up = randn(tokens, 2 * s["ffn"], dtype=dtype)

    def torch_path(fn):
        def run():
            with fused_kernels(False):
                fn()
        return run
    # (the switch costs host time, not GPU time: CUDA events time the GPU)
    bench_pair("rms_norm+residual", model, tokens, lambda: triton_ops.rms_norm(x, norm.weight, 1e-5, residual),
               torch_path(lambda: norm(x, residual)), 4 * tokens * hidden * es)
    bench_pair("rotary_inplace", model, tokens, lambda: triton_ops.rotary_inplace_(positions, q, k, rotary.cos_sin),
               torch_path(lambda: rotary(positions, q, k)), 2 * tokens * (q_size + kv_size) * es)
    bench_pair("silu_and_mul", model, tokens, lambda: triton_ops.silu_and_mul(gate_up),
               torch_path(lambda: SiluAndMul()(gate_up)), 3 * tokens * s["ffn"] * es)
    bench_pair("gelu_tanh_and_mul", model, tokens, lambda: triton_ops.gelu_tanh_and_mul(gate_up),
               torch_path(lambda: GeluAndMul()(gate_up)), 3 * tokens * s["ffn"] * es)


def bench_layers(model_name: str, s: dict, batch: int, ctx: int) -> None:
    """The whole decode step of a few layers: what the fusion saves per layer, with host
    overhead (eager) and without (graph)."""
    model, ids, pos, meta = build_layers(s, HALF, batch, ctx)
    row = {"kind": "bench", "kernel": f"decode step, {s['layers']} layers", "model": model_name,
           "dtype": dname(HALF), "batch": batch, "ctx": ctx}
    with torch.inference_mode():
        for on in (True, False):
            with fused_kernels(on):
                tag = "fused" if on else "torch"
                row[f"{tag}_eager_us_per_layer"] = round(time_us(lambda: model(ids, pos, meta)) / s["layers"], 1)
                if not SMOKE:
                    row[f"{tag}_graph_us_per_layer"] = round(
                        time_us(lambda: model(ids, pos, meta), graph=True) / s["layers"], 1)
    emit(row)


def bench_prefill(model: str, s: dict, batch: int, q_len: int, **config) -> float:
    dtype, H, Hkv, D = HALF, s["heads"], s["kv_heads"], s["head_dim"]
    meta, kc, vc, key, _ = attn_check.build_step([(q_len, q_len)] * batch, 0, 16, Hkv, D, dtype, device=DEVICE)
    query = randn(batch * q_len, H, D, dtype=dtype)
    out = torch.empty_like(query)

    def ours():
        triton_kernels.prefill_attention(out, query, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                         D**-0.5, 0, batch, q_len, **config)

    us = time_us(ours)
    flops = 4 * batch * H * D * q_len * (q_len + 1) / 2
    row = {"kind": "sweep" if config else "bench", "kernel": "prefill attention", "model": model, "dtype": dname(dtype),
           "batch": batch, "q_len": q_len, "heads": f"{H}/{Hkv}x{D}", **config, "triton_us": round(us, 1),
           "triton_TFLOPs": round(flops / us / 1e6, 1)}
    if not config:
        row.update(default_config=list(triton_kernels.prefill_config(D, dtype, query.device)))
        q = randn(batch, H, q_len, D, dtype=dtype)
        kv = randn(batch, Hkv, q_len, D, dtype=dtype)
        sdpa_us, backend = sdpa_time(q, kv)
        row.update(sdpa_us=round(sdpa_us, 1), sdpa_backend=backend, sdpa_TFLOPs=round(flops / sdpa_us / 1e6, 1),
                   ratio_of_sdpa=round(sdpa_us / us, 2))
    emit(row)
    return us


def sdpa_time(q, kv) -> tuple[float, str]:
    """torch SDPA, causal, GQA: the flash backend if it takes these inputs, else torch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    run = lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)  # noqa: E731
    if not SMOKE:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                run()
                return time_us(run), "flash"
        except RuntimeError:
            pass
    return time_us(run), "default"


def bench_decode(model: str, s: dict, batch: int, ctx: int, bound: int, ceiling_gbs: float, **config) -> float:
    dtype, H, Hkv, D = HALF, s["heads"], s["kv_heads"], s["head_dim"]
    meta, kc, vc, _, _ = attn_check.build_step([(ctx, 1)] * batch, batch, 16, Hkv, D, dtype, device=DEVICE)
    query = randn(batch, H, D, dtype=dtype)
    out = torch.empty_like(query)

    def ours():
        triton_kernels.decode_attention(out, query, kc, vc, meta.block_tables, meta.seq_lens, D**-0.5, bound, **config)

    us = time_us(ours, graph=not SMOKE)
    kv_bytes = 2 * batch * ctx * Hkv * D * dtype.itemsize
    emit({"kind": "sweep" if config else "bench", "kernel": "decode attention (graph)", "model": model,
          "dtype": dname(dtype), "batch": batch, "ctx": ctx, "bound": bound, "heads": f"{H}/{Hkv}x{D}", **config,
          "partitions": config.get("num_partitions") or triton_kernels.decode_num_partitions(batch, Hkv, bound),
          "triton_us": round(us, 1), "kv_GBps": round(kv_bytes / us / 1e3),
          "pct_of_copy_bw": round(100 * kv_bytes / us / 1e3 / ceiling_gbs, 1) if ceiling_gbs else None})
    return us


def run_sweeps(model: str, s: dict, ceiling: float) -> None:
    # (the smoke run takes one value of most knobs: it proves the loop, not the choice)
    batch, q_len = (1, 64) if SMOKE else (4, 2048)
    best = {}
    for block_m in (64, 128):
        for block_n in (32,) if SMOKE else (32, 64, 128):
            for num_warps in (4,) if SMOKE else (4, 8):
                for num_stages in (2,) if SMOKE else (2, 3, 4):
                    config = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
                    with contextlib.suppress(Exception):  # a config past shared memory: skip it
                        best[tuple(config.values())] = bench_prefill(model, s, batch, q_len, **config)
    if best:
        emit({"kind": "sweep best", "kernel": "prefill attention", "model": model, "batch": batch, "q_len": q_len,
              "block_m,block_n,warps,stages": min(best, key=best.get), "us": round(min(best.values()), 1)})
    for batch in (2,) if SMOKE else (1, 16, 64, 256):
        best = {}
        for num_partitions in (1, 2) if SMOKE else (1, 2, 4, 8, 16, 32):
            for block_n in (16,) if SMOKE else (32, 64, 128):
                for num_warps, num_stages in ((4, 2),) if SMOKE else ((4, 2), (4, 3), (8, 2)):
                    config = dict(num_partitions=num_partitions, min_partition=block_n, block_n=block_n,
                                  num_warps=num_warps, num_stages=num_stages)
                    with contextlib.suppress(Exception):
                        best[tuple(config.values())] = bench_decode(model, s, batch, 64 if SMOKE else 1024,
                                                                    64 if SMOKE else 1024, ceiling, **config)
        if best:
            emit({"kind": "sweep best", "kernel": "decode attention", "model": model, "batch": batch,
                  "partitions,min_partition,block_n,warps,stages": min(best, key=best.get),
                  "us": round(min(best.values()), 1)})


def run_timings(models: dict[str, dict], sweep: bool) -> bool:
    ceiling = 0.0 if SMOKE else attn_check.copy_bandwidth_gbs()
    emit({"kind": "device", "device": torch.cuda.get_device_name() if not SMOKE else "cpu (interpreter)",
          "copy_bandwidth_GBps": round(ceiling), "torch": torch.__version__,
          "triton": __import__("triton").__version__})
    ok = True
    for model, s in models.items():
        for tokens in (3,) if SMOKE else (64, 4096):
            ok &= guarded(f"bench elementwise {model}", bench_elementwise, model, s, tokens)
        ok &= guarded(f"bench decode step {model}", bench_layers, model, s, *((2, 20) if SMOKE else (64, 512)))
        for batch, q_len in ((1, 40),) if SMOKE else ((1, 2048), (4, 2048), (1, 8192)):
            ok &= guarded(f"bench prefill {model}", bench_prefill, model, s, batch, q_len)
        for batch in (1, 3) if SMOKE else (1, 64, 256):
            ctx = 40 if SMOKE else 1024
            for bound in (ctx, 1024 if SMOKE else 131072):
                ok &= guarded(f"bench decode {model}", bench_decode, model, s, batch, ctx, bound, ceiling)
        if sweep:
            ok &= guarded(f"sweeps {model}", run_sweeps, model, s, ceiling)
    return ok


# ---------------------------------------------------------------------------- main


def print_table() -> None:
    print("\n== fused kernels against the torch ops they replace (GPU microseconds, median)")
    print(f"  {'kernel':<20} {'model':<14} {'tokens':>6} {'fused':>9} {'torch':>9} {'speedup':>7} {'GB/s':>6}")
    for r in ROWS:
        if r["kind"] == "bench" and "fused_us" in r:
            print(f"  {r['kernel']:<20} {r['model']:<14} {r['tokens']:>6} {r['fused_us']:>9} {r['torch_us']:>9} "
                  f"{r['speedup']:>7} {r['fused_GBps']:>6}")
    print("== layers, attention, sweeps")
    for r in ROWS:
        failed_check = r["kind"] == "check" and r["result"] != "PASS"
        if failed_check or r["kind"] == "sweep best" or (r["kind"] == "bench" and "fused_us" not in r):
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items() if k != "kind"))
    checks = [r for r in ROWS if r["kind"] == "check"]
    print(f"== checks: {sum(r['result'] == 'PASS' for r in checks)} of {len(checks)} pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--sweep", action="store_true", help="also sweep prefill tiles and decode partitions")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--models", default=",".join(MODEL_CONFIGS),
                        help="comma-separated shapes to run (default: all of %(default)s)")
    args = parser.parse_args()
    models = shapes(args.models.split(","))
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or with --interpret-smoke here")
    torch.manual_seed(0)
    ok = guarded("layer dispatch", check_dispatch)
    for model, s in models.items():
        for dtype in DTYPES:
            for tokens in (1, 5) if SMOKE else (1, 37, 512):
                ok &= guarded(f"elementwise {model} {dname(dtype)}", check_elementwise, model, s, dtype, tokens)
            ok &= guarded(f"attention {model} {dname(dtype)}", check_attention, model, s, dtype)
        ok &= guarded(f"decoder layers {model}", check_layers, model, s)
    emit({"kind": "all checks", "result": "PASS" if ok else "FAIL"})
    if not args.no_timing:
        ok &= guarded("timings", run_timings, models, args.sweep)
    print_table()
    print(f"JSON lines: {JSONL}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
