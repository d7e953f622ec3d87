"""The decode GEMV (layers/triton_linear.py) against F.linear, on CPU through Triton's interpreter;
scripts/gpu_linear_bench.py checks it on the GPU in bf16 and times it against cuBLAS.

Shapes leave tails everywhere a mask matters: N not a multiple of BLOCK_N, K not a multiple of
BLOCK_K or of the split, rows short of the 16 that tl.dot pads to.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pagedllm.layers import triton_linear  # noqa: E402

# The interpreter's tl.dot multiplies bf16 as raw bits: half precision is checked with fp16 here.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, n, k, config", [
    (1, 300, 1000, None),            # launch_config's shape, no split (too short to split)
    (3, 200, 4096, None),            # launch_config splits K 8 ways
    (8, 130, 640, (64, 128, 2)),     # split with a partial last tile
    (16, 96, 1000, (32, 128, 4)),    # 16 rows, K not a multiple of the split
    (5, 64, 384, (64, 64, 8)),       # more splits asked for than K has tiles: 6 are taken
])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_f_linear(dtype, rows, n, k, config, bias):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    y = triton_linear.linear(x, w, b, config=config)
    assert y.dtype == dtype and y.shape == (rows, n)
    torch.testing.assert_close(y.float(), expected, **TOLERANCE[dtype])
    # the arrival counts are left at zero: a second call sums the same splits to the same bits
    assert torch.equal(triton_linear.linear(x, w, b, config=config), y)


def test_rows_of_a_wider_tensor():
    """x may be a view whose rows are longer than K (a slice of a fused projection's output)."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 700, generator=gen)
    w = torch.randn(70, 600, generator=gen)
    x = wide[:, :600]
    torch.testing.assert_close(triton_linear.linear(x, w), F.linear(x, w), **TOLERANCE[torch.float32])


def test_takes_only_few_rows_of_large_half_matrices():
    w = torch.empty(64, triton_linear.MIN_K, dtype=torch.bfloat16)
    few = torch.empty(triton_linear.MAX_ROWS, triton_linear.MIN_K, dtype=torch.bfloat16)
    assert triton_linear.takes(few, w)
    assert triton_linear.takes(few[:1].half(), w.half())
    assert not triton_linear.takes(torch.empty(triton_linear.MAX_ROWS + 1, triton_linear.MIN_K, dtype=torch.bfloat16), w)
    assert not triton_linear.takes(few.float(), w.float())  # fp32 stays on cuBLAS (tl.dot would round to tf32)
    assert not triton_linear.takes(few[:, :2048], w[:, :2048])  # cuBLAS is as fast below MIN_K
    assert not triton_linear.takes(few, w.t().contiguous().t())  # columns of W not contiguous


@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (28672, 4096), (3072, 4096), (128256, 4096)])
def test_launch_config_fills_the_gpu(n, k):
    """Every llama-8b matrix (TP=1 and 2) gets at least 192 programs of whole 128-wide K tiles."""
    block_n, block_k, split_k = triton_linear.launch_config(n, k)
    assert -(-n // block_n) * split_k >= 192
    assert k % (split_k * block_k) == 0
