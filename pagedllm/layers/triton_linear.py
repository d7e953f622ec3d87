"""y = x W^T (+ b) for decode-sized batches on the GPU: a Triton GEMV that reads W at the
memory's rate, where cuBLAS reads it slower.

    x (M, K), M <= MAX_ROWS      W (N, K), rows of K contiguous      y (M, N) in x's dtype

At a few rows a product costs the read of W. On an H200, cuBLAS reads the 8B's matrices at
2.1-4.2 TB/s at one row (a split-K reduce is a second kernel for some shapes). Here a program
owns BLOCK_N outputs and 1/SPLIT_K of K and streams (BLOCK_N, BLOCK_K) tiles of W through a
4-stage pipeline; tl.dot multiplies them with x's rows (padded to 16) on the tensor cores and
accumulates in float32; the bias is added in float32 and the sum rounded once, as cuBLAS does.
With SPLIT_K > 1 each program stores its float32 partial sums and the last program of a column
block to finish (an arrival count, left at zero) adds the splits in split order: one kernel,
and the same sum whichever program finished last.

Where the kernel is taken (K >= MIN_K, M <= MAX_ROWS) and its launch shape come from an H200
sweep of the 20 matrices of smollm2, llama-1b and llama-8b at TP=1 and 2 (docs/kernels.md):
below MIN_K cuBLAS was as fast or faster; at 16 rows it caught up.

Imported only on CUDA (layers/fused.py decides); the tests run the kernel on CPU under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.arrival_counts import arrival_counts

MAX_ROWS = 8
MIN_K = 4096
_DTYPES = (torch.float16, torch.bfloat16)
_BLOCK_M = 16  # tl.dot's smallest M: x's rows are padded to it
_BLOCK_K = 128
_PROGRAMS = 192  # K is split in two until the grid has this many programs


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T runs here: float16/bfloat16, at most MAX_ROWS rows, K >= MIN_K, rows
    of K contiguous."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and weight.shape[1] >= MIN_K and x.dtype in _DTYPES
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(y_ptr, x_ptr, w_ptr, b_ptr, partial_ptr, arrivals_ptr, M, N, K, k_per_split,
                 stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        kk = k + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < k_end), other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=(cols[:, None] < N) & (kk[None, :] < k_end), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K > 1:
        tile = rows[:, None] * N + cols[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial sums are stored before the count says so
        last = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:  # the column block's last program: the splits in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(partial_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + pid_n, 0)
        out_mask = out_mask & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def launch_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K) for a W of (n, k): 128 columns a program where that still makes
    128 programs, else 64, and K split in two until the grid has _PROGRAMS programs (at most 8
    splits, none shorter than a tile)."""
    block_n = 128 if triton.cdiv(n, 128) >= 128 else 64
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < _PROGRAMS and k // (2 * split_k) >= _BLOCK_K and split_k < 8:
        split_k *= 2
    return block_n, _BLOCK_K, split_k


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: tuple[int, int, int] | None = None, num_stages: int = 4) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias -> (M, N), M <= 16. config: (BLOCK_N, BLOCK_K, SPLIT_K)
    instead of launch_config's, and num_stages (the sweep in scripts/gpu_linear_bench.py)."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= _BLOCK_M and weight.shape[1] == K, f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows of K must be contiguous"
    block_n, block_k, split_k = config or launch_config(N, K)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    n_blocks = triton.cdiv(N, block_n)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partial = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else y
    _gemv_kernel[(n_blocks, split_k)](
        y, x, weight, bias if bias is not None else y, partial, arrival_counts("decode GEMV", x.device, n_blocks),
        M, N, K, k_per_split, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=4, num_stages=num_stages,
    )
    return y
