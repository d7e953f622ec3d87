"""The fused CPU kernels for the work between the matrix products (float32 or bfloat16): what
layers/triton_ops.py is on CUDA, with the same functions, so a layer asks `fused_ops_for(x)`
(layers/fused.py) and calls either. The C code is layers/csrc/cpu_kernels.c.

    rms_norm            x [+ residual] -> norm(x + residual) * weight, and x + residual
                        torch: add, rms_norm (pow, mean, add, rsqrt, mul, mul)
    rotary_inplace_     q, k rotated in place by the cos/sin rows of their positions
                        torch: index_select, chunk, cat, 2 mul, add, cat, float, to  (x2)
    silu_and_mul        [gate | up] -> silu(gate) * up          torch: chunk, silu, mul
    gelu_tanh_and_mul   [gate | up] -> gelu_tanh(gate) * up     torch: chunk, gelu, mul

and for the torch attention backend on CPU: the paged KV cache write and attention reading the
cache blocks in place (torch gathers them into a padded copy first), on float32, float16 or
bfloat16 caches (CACHE_DTYPES; 16 bits halve the bytes a decode step reads, rounded at the write).

Activations are float32 or bfloat16 (ACTIVATION_DTYPES), weights of the activations' dtype. The
arithmetic is float32 either way; in bfloat16 each kernel rounds where the torch code of a
bfloat16 model rounds (the residual sum, the normalized row before the weight, act(gate) before
the product), so the two agree to about one bfloat16 ulp. Before these, a bfloat16 model ran the
torch code and gathered its K/V for SDPA: on a Xeon (AMX, 2 threads) a 64-sequence decode step
took 158-166 ms, of which the products 30 and attention with its gather and casts ~70; with these,
126 ms, and the 64-request workload 329 -> 425 tok/s (docs/benchmarks.md).

Each is one call where torch takes several, each of which costs 5-30 µs on a small CPU
whatever its size: at batch 1 that fixed cost, not arithmetic, is most of a decode step.
Results agree with the torch code to float32 rounding (other summation orders, fused
multiply-adds, e^x to ~2 ulp), not bit for bit. Rows may be views into a wider tensor (q, k, v
sliced out of one qkv projection) as long as the last dimension is contiguous.
"""

from __future__ import annotations

import torch

from pagedllm.layers.cpu_kernels import TYPE_CODES, lib

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # the activations the kernels take (layers/fused.py)
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the KV caches they read and write


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as a 2-D tensor of rows of its last dimension with that dimension contiguous (a view
    where one does, else a copy), and its row stride."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """norm(x) * weight, or with a residual (norm(x + residual) * weight, x + residual)."""
    rows, x_stride = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype)
    dtype = _type(x, weight, residual)
    if residual is None:
        lib().rms_norm(rows.data_ptr(), x_stride, None, 0, weight.data_ptr(), eps, out.data_ptr(), None, *rows.shape, dtype)
        return out
    res_rows, res_stride = _rows(residual)
    res_out = torch.empty(x.shape, dtype=x.dtype)
    lib().rms_norm(rows.data_ptr(), x_stride, res_rows.data_ptr(), res_stride, weight.data_ptr(), eps, out.data_ptr(),
                   res_out.data_ptr(), *rows.shape, dtype)  # fmt: skip
    return out, res_out


def _type(x: torch.Tensor, *others: torch.Tensor | None) -> int:
    """The kernels' type code of activations x (others, if given, must share its dtype)."""
    if x.dtype not in ACTIVATION_DTYPES or any(o is not None and o.dtype != x.dtype for o in others):
        dtypes = [str(t.dtype).removeprefix("torch.") for t in (x, *others) if t is not None]
        raise ValueError(f"the CPU kernels take float32 or bfloat16 tensors of one dtype, not {', '.join(dtypes)}")
    return TYPE_CODES[x.dtype]


def _heads(x: torch.Tensor) -> int:
    """The token stride of x (T, H, D), whose heads must lie D apart with D contiguous."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError(f"heads of a tensor with strides {x.stride()}: each token's heads must be contiguous")
    return x.stride(0)


def rotary_inplace_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rotate q (T, H, D) and k (T, Hkv, D) in place; returns them. cos_sin: (max_position, D) =
    [cos | sin], float32."""
    positions = positions if positions.dtype == torch.int64 else positions.long()
    if cos_sin.dtype != torch.float32:
        raise ValueError(f"the rotary table is float32, not {cos_sin.dtype}")
    dtype = _type(q, k)
    for x in (q, k):
        lib().rotary(x.data_ptr(), _heads(x), x.shape[0], x.shape[1], x.shape[2], positions.data_ptr(), cos_sin.data_ptr(), dtype)
    return q, k


def _act_and_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    width = x.shape[-1] // 2
    rows, stride = _rows(x)
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype)
    lib().act_and_mul(rows.data_ptr(), stride, out.data_ptr(), rows.shape[0], width, act, _type(x))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] (..., 2I) -> silu(gate) * up (..., I)."""
    return _act_and_mul(x, 0)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] (..., 2I) -> gelu(gate, approximate="tanh") * up (..., I)."""
    return _act_and_mul(x, 1)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:  # fmt: skip
    """key, value (T, Hkv, D) to their slots of the (num_blocks, block_size, Hkv, D) caches, rounded to the caches' dtype."""
    lib().write_kv(key.data_ptr(), _heads(key), value.data_ptr(), _heads(value), k_cache.data_ptr(), v_cache.data_ptr(),
                   slot_mapping.data_ptr(), key.shape[0], key.shape[1] * key.shape[2], _type(key, value),
                   cache_type(k_cache, v_cache))  # fmt: skip


def cache_type(k_cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> int:
    """The kernels' type code of a KV cache (float32, float16 or bfloat16)."""
    if k_cache.dtype not in CACHE_DTYPES or (v_cache is not None and v_cache.dtype != k_cache.dtype):
        raise ValueError(f"the CPU kernels read float32, float16 or bfloat16 KV caches, not {k_cache.dtype}")
    return TYPE_CODES[k_cache.dtype]


def context_arrays(block_tables: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block tables (rows contiguous) and context lengths as the C kernels read them: int32."""
    tables = block_tables.to(torch.int32)
    return (tables if tables.stride(-1) == 1 else tables.contiguous()), seq_lens.to(torch.int32).contiguous()


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                    query_start_loc: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """query (T, H, D) -> (T, H, D): attention on the paged cache. Sequence b's query tokens are
    rows query_start_loc[b] to query_start_loc[b + 1] (row b alone when it is None: a decode
    step), the last of them at position seq_lens[b] - 1, each over its context up to itself (the
    last sliding_window tokens of it), read through block_tables (B, n). A row's result is the same
    whichever rows it is computed with."""
    tokens, heads, dim = query.shape
    out = torch.empty(tokens, heads, dim, dtype=query.dtype)
    tables, lens = context_arrays(block_tables, seq_lens)
    starts = None if query_start_loc is None else query_start_loc.to(torch.int32).contiguous()
    status = lib().paged_attention(
        query.data_ptr(), _heads(query), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), None if starts is None else starts.data_ptr(), lens.shape[0], heads, k_cache.shape[2], dim,
        k_cache.shape[1], scale, sliding_window or 0, out.data_ptr(), _type(query), cache_type(k_cache, v_cache),
    )
    if status:
        raise MemoryError("out of memory for attention scores")
    return out
