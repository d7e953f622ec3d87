"""Every request's block table as one row of a preallocated table, kept on the host and on
the device and updated by the blocks each step appends (never rebuilt per step).

    rows:  request -> row             block ids of the request: table[row, :num_blocks[row]]

    host   [max_rows, max_blocks_per_seq] int32   (numpy: slot mapping is computed from it)
    device [max_rows, max_blocks_per_seq] int32   (a step's block tables are one gather of rows)

New block ids are written to the host table at once and queued for the device, where one
scatter per step applies them (on the CPU both are the same memory).
"""

from __future__ import annotations

import numpy as np
import torch


class BlockTables:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, device: str) -> None:
        self.device = device
        self.width = max_blocks_per_seq
        self.host = np.zeros((max_rows, self.width), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self._queued_slots: list[int] = []  # flat indices written on the host since the last sync
        self._queued_ids: list[int] = []
        self._mirror()

    def _mirror(self) -> None:
        """The device table as a whole copy of the host's (on the CPU: the same memory)."""
        table = torch.from_numpy(self.host)
        self.device_table = table if self.device == "cpu" else table.to(self.device)
        self._queued_slots.clear()
        self._queued_ids.clear()

    def add(self) -> int:
        """A row for a new request."""
        if not self.free_rows:  # more requests alive than foreseen: double the rows (rare)
            n = len(self.host)
            self.host = np.concatenate([self.host, np.zeros_like(self.host)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self.free_rows = list(range(2 * n - 1, n - 1, -1))
            self._mirror()
        row = self.free_rows.pop()
        self.num_blocks[row] = 0
        return row

    def remove(self, row: int) -> None:
        self.free_rows.append(row)

    def append(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.width:
            raise ValueError(f"a request needs {end} KV blocks, more than max_model_len allows ({self.width})")
        self.host[row, start:end] = block_ids
        self.num_blocks[row] = end
        if self.device != "cpu":
            first = row * self.width + start
            self._queued_slots.extend(range(first, first + len(block_ids)))
            self._queued_ids.extend(block_ids)

    def sync(self, to_device) -> None:
        """Apply the queued writes to the device table (one scatter)."""
        if not self._queued_slots:
            return
        slots = to_device(np.array(self._queued_slots, dtype=np.int64))
        ids = to_device(np.array(self._queued_ids, dtype=np.int32))
        self.device_table.view(-1)[slots] = ids
        self._queued_slots.clear()
        self._queued_ids.clear()

    def gather(self, rows: np.ndarray, to_device) -> torch.Tensor:
        """The block tables of a step's sequences, [len(rows), width], on the device."""
        if self.device == "cpu":
            return torch.from_numpy(self.host[rows])
        return self.device_table[to_device(rows)]
