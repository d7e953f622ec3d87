"""Prefix-cache keys: a full block is named by sha256(parent key, its token ids, extra keys).

Python's `hash()` of a tuple is 64 bits and not collision resistant: two different
prefixes with the same hash would share KV cache (wrong output, and on a shared server
one user's prompt leaking into another's answer; vLLM's GHSA-rm76-4mrf-v9r8). sha256 makes
a collision practically impossible; the block manager also checks the tokens and the
parent on every hit, so even a broken hash could only cost a miss.

The encoding is unambiguous: the parent key is always 32 bytes (a fixed root for the
first block), the token ids are 8 bytes each (every block of one cache has the same
size) and the extra keys (anything else the block's K/V depend on) come last.
Token ids are packed with a cached `struct.Struct` (faster than `array` or pickle): the
whole key costs a few microseconds per 16-token block, a few times `hash()` of a tuple
and small beside a model step (scripts/bench_block_hash.py measures it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_KEY = bytes(32)  # the "parent" of a request's first block


_packers: dict[int, struct.Struct] = {}  # one per block size (and for partial slices)


def token_bytes(token_ids: Sequence[int]) -> bytes:
    packer = _packers.get(len(token_ids))
    if packer is None:
        packer = _packers[len(token_ids)] = struct.Struct(f"<{len(token_ids)}q")
    return packer.pack(*token_ids)


def hash_block(parent_key: bytes | None, block_token_bytes: bytes, extra_keys: bytes = b"") -> bytes:
    # One concatenation and one call: cheaper than update() per part for ~160 bytes.
    return hashlib.sha256((parent_key or ROOT_KEY) + block_token_bytes + extra_keys).digest()
