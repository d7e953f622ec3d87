"""Fused Triton kernels for the elementwise work between the GEMMs (GPU).

Each one replaces a chain of PyTorch ops that reads and writes the activations several
times (and launches a kernel per op) with one pass over them:

    rms_norm            x [+ residual] -> norm(x + residual) * weight, and x + residual
                        torch: add, float, pow, mean, add, rsqrt, mul, to, mul   (~9 kernels)
    rotary_inplace_     q, k rotated in place by the cos/sin rows of their positions (NeoX
                        "rotate half"), both in one launch
                        torch: index, chunk, float, 4 mul, sub, add, cat, to  (x2 for q and k)
    silu_and_mul        [gate | up] -> silu(gate) * up          torch: silu, mul
    gelu_tanh_and_mul   [gate | up] -> gelu_tanh(gate) * up     torch: gelu, mul

Numerics follow the torch code in norm.py / rotary.py / activation.py, including where
it rounds to the activation dtype in between (the residual sum is rounded before it is
normalised; silu(gate) is rounded before the product), so bf16 results agree with the
torch path to the last bit except where an fp32 reduction's order differs.

Rows: the norm and the activations treat a tensor as rows of its last dimension. A 3-D
input (T, H, D) with a strided T (q or k heads sliced out of a fused qkv projection) is
addressed as row r -> (r // H) * stride(0) + (r % H) * stride(1), so nothing is copied.

Imported only when a tensor is on CUDA (layers/fused.py decides); the tests run these
kernels on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _row_layout(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_rows, rows per outer index, outer stride, inner stride) of t's rows of its last dim."""
    assert t.stride(-1) == 1, "the last dim must be contiguous"
    if t.dim() == 1:
        return 1, 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    assert t.dim() == 3, f"rows of a {t.dim()}-D tensor"
    return t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)


def _num_warps(block: int) -> int:
    """One warp per 256 elements of a row (8 bf16 per thread), 1..16 warps."""
    return max(1, min(16, block // 256))


# ---------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(out_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr, eps, hidden,
                     inner, stride_x_outer, stride_x_inner, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. With a residual: s = round(x + residual) is stored to res_out and
    normalised; without one, s = x. out = round(round(s * rsqrt(mean(s^2) + eps)) * weight)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x_row = (row // inner) * stride_x_outer + (row % inner) * stride_x_inner
    s = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        s = (s.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        s = s.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / hidden + eps)
    normed = (s * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight, or with a residual (norm(x + residual) * weight, x + residual), as
    RMSNorm.forward; new tensors, the inputs are left as they are. x: (..., hidden)."""
    hidden, shape = x.shape[-1], x.shape
    assert weight.shape == (hidden,), f"weight {tuple(weight.shape)} for hidden size {hidden}"
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.reshape(-1, hidden).contiguous()
    num_rows, inner, stride_outer, stride_inner = _row_layout(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        assert residual.shape == x.shape and x.dim() <= 2, "a residual is added to (tokens, hidden) rows"
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty_like(out)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        row_stride = lambda t: t.stride(0) if t is not None and t.dim() == 2 else hidden  # noqa: E731
        _rms_norm_kernel[(num_rows,)](
            out, res_out if res_out is not None else out, x, residual if residual is not None else x, weight,
            eps, hidden, inner, stride_outer, stride_inner, row_stride(residual), row_stride(out), row_stride(res_out),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
        )
    return out.view(shape) if residual is None else (out.view(shape), res_out.view(shape))


# ---------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(x_ptr, stride_head, num_heads, cos, sin,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    """Rotate one token's heads in place: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin]."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    p1 = x_ptr + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_sin_ptr, positions_ptr, num_q_heads, num_k_heads,
                   stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                   K_HEADS_PAD: tl.constexpr):
    """One program per token: its cos/sin row is read once for all q and k heads.
    cos_sin[pos] = [cos(pos f_0) .. cos(pos f_{D/2-1}) | sin(...)], fp32, as rotary.py builds it."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cs = cos_sin_ptr + pos * stride_cs + dims
    cos = tl.load(cs, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, num_q_heads, cos, sin, HALF, HALF_PAD, Q_HEADS_PAD)
    _rotate_heads(k_ptr + tok * stride_k_tok, stride_k_head, num_k_heads, cos, sin, HALF, HALF_PAD, K_HEADS_PAD)


def rotary_inplace_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, Hkv, D) in place (views of a fused qkv output are fine:
    only the head dim must be contiguous); returns them. cos_sin: (max_position, D), fp32 as
    rotary.py builds it (a table cast to another dtype is read as it is, like the torch code)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "the head dim must be contiguous"
    assert cos_sin.shape[-1] == head_dim and cos_sin.stride(-1) == 1
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, cos_sin, positions, num_q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
            K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            num_warps=_num_warps(triton.next_power_of_2(num_q_heads) * triton.next_power_of_2(half)),
        )
    return q, k


# ---------------------------------------------------------------------------- gated activations


@triton.jit
def _act_and_mul_kernel(out_ptr, x_ptr, width, stride_x, stride_o, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(width, BLOCK)): out[r, c] = round(act(x[r, c])) * x[r, width + c]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        act = gate * tl.sigmoid(gate)
    else:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g sigmoid(2z)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(2.0 * z)
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    assert x.shape[-1] % 2 == 0, f"a [gate | up] last dim must be even, got {x.shape[-1]}"
    width = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    if x2.shape[0] and width:
        block = min(1024, triton.next_power_of_2(width))
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](
            out, x2, width, x2.stride(0), width, ACT=act, BLOCK=block, num_warps=_num_warps(block),
        )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] (..., 2I) -> silu(gate) * up (..., I)."""
    return _act_and_mul(x, "silu")


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] (..., 2I) -> gelu(gate, approximate="tanh") * up (..., I)."""
    return _act_and_mul(x, "gelu_tanh")
