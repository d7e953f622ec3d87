"""Zeroed int32 counts that a Triton kernel's programs add to, so that the last program of a
group to finish knows it is last and finishes the group's work (decode attention merging its
partitions, the decode GEMV adding its K splits). Every call leaves the counts it used at zero,
so one tensor serves every call of a kernel on a device.

Each kernel has its own tensor (`owner`): kernels on one stream never overlap, but a shared
tensor would tie each kernel's correctness to every other's. A tensor is allocated eagerly,
before any CUDA graph is captured (DecodeGraphs warms each batch size up first), and large
enough for any batch a graph holds.
"""

from __future__ import annotations

import torch

_MIN_COUNTS = 1 << 16
_COUNTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def arrival_counts(owner: str, device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counts for owner's kernel on device."""
    counts = _COUNTS.get((owner, device))
    if counts is None or counts.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner} needs {n} arrival counts, first asked for during CUDA graph capture")
        counts = _COUNTS[(owner, device)] = torch.zeros(max(n, _MIN_COUNTS), dtype=torch.int32, device=device)
    return counts
