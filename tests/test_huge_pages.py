"""Weights the CPU kernels stream live in huge-page arenas (layers/huge_pages.py)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers import huge_pages
from pagedllm.layers.cpu_kernels import Q4Blocks, Tiles


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def test_arena_tensors_are_separate_aligned_and_keep_their_values():
    tensors = [huge_pages.empty((n, 7), torch.float16) for n in (1, 3, 1000, 5)]
    for i, t in enumerate(tensors):
        t.fill_(i)
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
    for i, t in enumerate(tensors):
        assert torch.equal(t, torch.full_like(t, i))  # no tensor overlaps another
    source = torch.randn(6, 5).t()  # not contiguous
    copied = huge_pages.copy(source)
    assert copied.is_contiguous() and torch.equal(copied, source)
    big = huge_pages.empty((70 << 20,), torch.uint8)  # larger than an arena: a map of its own
    big[-1] = 7
    assert big.numel() == 70 << 20 and int(big[-1]) == 7


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="this kernel grants no transparent huge pages")
def test_weight_tiles_are_on_huge_pages():
    """64 MiB of q4 tiles (as a model's loader builds them), written: the process's anonymous
    huge pages grow by most of that."""
    before = _anon_huge_kb()
    n, k = 8192, 16384  # 64 MiB of 4-bit values
    tiles = Tiles.of(Q4Blocks(torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8), torch.ones(n, k // 32, 2).half()))
    grown = _anon_huge_kb() - before
    assert grown >= 48 << 10, f"only {grown} KB of huge pages for {tiles.qs.numel() >> 10} KB of tiles"


def test_an_arena_is_unmapped_with_the_last_tensor_in_it():
    """Weights dropped (a model unloaded) give their memory back, the arena being filled included."""
    import gc

    tensors = [huge_pages.empty((1000,), torch.uint8), huge_pages.empty((10,), torch.float32)]
    arena = huge_pages._arenas.current
    assert arena is not None and arena() is not None
    del tensors[0]
    gc.collect()
    assert arena() is not None  # the other still lives in it
    tensors.clear()
    gc.collect()
    assert arena() is None
