"""Memory on 2 MiB pages for the weights the CPU kernels stream at every step.

A decode step reads every weight matrix once. On 4 KiB pages that is a TLB miss every 4 KiB
(a nested page walk in a VM) and a hardware prefetcher that stops at each page's end. Where the
kernel grants transparent huge pages to memory that asks for them (`madvise` or `always` in
/sys/kernel/mm/transparent_hugepage/enabled, as most distributions ship), weights placed here
stream faster: the bundled model's batch-1 decode with `--quantization gguf` went from 168 to
187 tok/s on a 2-core Zen 4 VM. Elsewhere this is ordinary memory.

The weights are small matrices (a few hundred KB each), so they are placed one after another in
arenas of 64 MiB, each one anonymous private map with MADV_HUGEPAGE. Only the pages written are
resident, so the last arena's tail costs nothing; an arena is unmapped when the last tensor in it
is freed (the module holds the one being filled only weakly).
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch

_ARENA_BYTES = 64 << 20
_ALIGN = 64  # a cache line


class _Arenas:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # the map being filled, held weakly: each tensor placed in it holds it (torch.frombuffer),
        # so it is unmapped with the last of them
        self.current: weakref.ref[mmap.mmap] | None = None
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """nbytes (> 0) of the current arena as a uint8 tensor, or of a new one where they do not fit."""
        with self.lock:
            arena = self.current() if self.current is not None else None
            if arena is None or self.used + nbytes > len(arena):
                arena, self.used = _mapped(max(nbytes, _ARENA_BYTES)), 0
                self.current = weakref.ref(arena)
            start, self.used = self.used, -(-(self.used + nbytes) // _ALIGN) * _ALIGN
            return torch.frombuffer(arena, dtype=torch.uint8, count=nbytes, offset=start)


def _mapped(nbytes: int) -> mmap.mmap:
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


_arenas = _Arenas()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor in huge-page memory (ordinary memory where the OS
    has no MADV_HUGEPAGE, i.e. is not Linux)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    return _arenas.take(nbytes).view(dtype).view(shape)


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in huge-page memory."""
    return empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)
