"""A checkpoint tensor that is read when asked, so that a tensor-parallel rank reads (and, for a
GGUF, dequantizes) only the rows it keeps.

The loaders hand these to the model in place of tensors (loader/checkpoint.py for .safetensors,
loader/gguf.py for GGUF). models/weights.py reads one whole for a parameter of its own, or
straight into its slice of a merged projection; a tensor-parallel layer's weight_loader takes
its rows with `narrow(0, ...)` or `copy_rows`. Anything else (a narrow along another dim, `t`)
reads the whole tensor first. A tensor can be read only while it is the loader's current one.
"""

from __future__ import annotations

import copy

import torch


class CheckpointTensor:
    """shape, dtype, dim() and to(dtype) as a tensor has them; read(), narrow(), t(), read_into().
    Subclasses read rows: _read_rows(start, count, out) -> rows start .. start + count of dim 0 in
    stored_dtype on device (into out if given), and say which row ranges they can read alone."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, current: list[bool]) -> None:
        """current: [True] while the loader has not moved on (shared by the .to() copies)."""
        self.name, self.shape, self.stored_dtype, self.device, self.current = name, torch.Size(shape), dtype, device, current
        self.cast: torch.dtype | None = None  # to(dtype), applied once read

    @property
    def dtype(self) -> torch.dtype:
        return self.cast or self.stored_dtype

    def dim(self) -> int:
        return len(self.shape)

    def to(self, dtype: torch.dtype) -> CheckpointTensor:
        other = copy.copy(self)
        other.cast = None if dtype == self.stored_dtype else dtype
        return other

    def read(self) -> torch.Tensor:
        return self._rows(0, self.shape[0] if self.shape else 1).view(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0 and self.shape and self._reads_rows(start, length):
            return self._rows(start, length)
        return self.read().narrow(dim, start, length)

    def t(self) -> torch.Tensor:
        return self.read().t()

    def read_into(self, dst: torch.Tensor, start: int = 0) -> None:
        """dst = rows start .. start + len(dst), read straight into dst where it can be (same
        dtype and device, contiguous): no tensor of its own, no second pass over the bytes."""
        count = dst.shape[0]
        if (self.cast is None and dst.dtype == self.stored_dtype and dst.is_contiguous() and dst.device == self.device
                and self._reads_rows(start, count)):
            if tuple(dst.shape[1:]) != tuple(self.shape[1:]):
                raise ValueError(f"tensor {self.name}: checkpoint rows of shape {tuple(self.shape[1:])}, model expects {tuple(dst.shape[1:])}")
            self._check_current()
            self._read_rows(start, count, dst)
        else:
            dst.copy_(self.narrow(0, start, count))

    def _rows(self, start: int, count: int) -> torch.Tensor:
        self._check_current()
        rows = self._read_rows(start, count, None)
        return rows if self.cast is None else rows.to(self.cast)

    def _check_current(self) -> None:
        if not self.current[0]:
            raise RuntimeError(f"tensor {self.name}: a checkpoint tensor is read only until the next one is taken")

    def _reads_rows(self, start: int, count: int) -> bool:
        return True

    def _read_rows(self, start: int, count: int, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def copy_rows(dst: torch.Tensor, src: torch.Tensor | CheckpointTensor, start: int = 0) -> None:
    """dst = rows start .. start + len(dst) of src; an unread src is read straight into dst."""
    if isinstance(src, CheckpointTensor):
        src.read_into(dst, start)
    else:
        dst.copy_(src.narrow(0, start, dst.shape[0]))
