"""The paged KV cache's bookkeeping: a pool of blocks, per-request block tables,
ref counts and the prefix cache.

    block_table[req] = [7, 2, 9]        block_size = 4
    tokens  0..3 -> block 7, 4..7 -> block 2, 8..(9) -> block 9 (partly filled)

A *full* block is keyed by sha256(parent block's key, its token ids) (block_hash.py),
so a key names the whole prefix up to and including that block. Full blocks are
registered in the prefix cache when they are allocated for computation (the
K/V are written in the same step, before any attention reads them). A freed
block keeps its hash and goes to the back of the free queue; allocation takes
from the front, evicting the hash of the block it takes (LRU). A hit on a free
cached block takes it back out of the free queue.

A hit is also verified, so that even a colliding key can only cost a miss, never
another prefix's K/V: the cached block must hold the same token ids and follow the
same parent. "Same parent" compares prefix ids: every distinct verified prefix
content gets a fresh id when first registered (never reused), and a block that
recomputes an already-cached prefix takes over that prefix's id, so equal ids mean
equal prefixes (by induction from the first block).

Invariants (asserted by check_invariants in tests):
  - every block is either in the free queue with ref_count 0, or has
    ref_count == the number of block tables listing it;
  - a block in the prefix cache holds the key it is registered under, its tokens and
    its prefix id;
  - after every request is freed, num_free_blocks == num_blocks.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from pagedllm.core.block_hash import hash_block, token_bytes
from pagedllm.core.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is registered in the prefix cache (full blocks only):
    block_hash: bytes | None = None  # its key
    token_bytes: bytes | None = None  # its token ids, packed: compared on a hit
    prefix_id: int | None = None  # names the prefix content ending at this block
    parent_prefix_id: int | None = None  # the previous block's prefix id (None: first block)

    def clear_prefix(self) -> None:
        self.block_hash = self.token_bytes = self.prefix_id = self.parent_prefix_id = None


class BlockPool:
    """Free queue (LRU order) + the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block key -> block id
        self._prefix_ids = itertools.count()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> Block:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its prefix-cache entry
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.clear_prefix()
        block.ref_count = 1
        return block

    def lookup(self, block_hash: bytes, parent_prefix_id: int | None, block_token_bytes: bytes) -> Block | None:
        """The cached block with this key, if it holds these tokens after this parent."""
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.parent_prefix_id != parent_prefix_id or block.token_bytes != block_token_bytes:
            return None  # a key collision: treat as a miss
        return block

    def acquire(self, block: Block) -> None:
        """Take another reference to a cached block (a prefix-cache hit)."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block.block_id} released more often than acquired"
        if block.ref_count == 0:
            self.free_queue[block.block_id] = None

    def register(self, block: Block, block_hash: bytes, parent_prefix_id: int | None, block_token_bytes: bytes) -> None:
        block.block_hash, block.token_bytes, block.parent_prefix_id = block_hash, block_token_bytes, parent_prefix_id
        same = self.lookup(block_hash, parent_prefix_id, block_token_bytes)
        if same is not None:  # the same prefix, computed twice: one name for both
            block.prefix_id = same.prefix_id
        else:
            block.prefix_id = next(self._prefix_ids)
            self.cached.setdefault(block_hash, block.block_id)  # a colliding entry keeps its place


class KVCacheManager:
    """Answers the scheduler: which blocks a request already has cached, and
    whether room can be made for the tokens it wants to run this step."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[Block]] = {}
        self.block_hashes: dict[str, list[bytes]] = {}  # keys of a request's full blocks, in order
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.block_tables.get(request_id, ())]

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of cached full blocks at the start of the request's tokens.
        At least one token is always left to compute: its logits are needed."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        hits: list[Block] = []
        key: bytes | None = None
        prefix_id: int | None = None
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens, bs = request.all_token_ids, self.block_size
        for i in range(max_blocks):
            block_tokens = token_bytes(tokens[i * bs : (i + 1) * bs])
            key = hash_block(key, block_tokens)
            block = self.pool.lookup(key, prefix_id, block_tokens)
            if block is None:
                break
            hits.append(block)
            prefix_id = block.prefix_id
        return hits

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Prefix-cache statistics, counted once per admitted request."""
        self.num_queries += num_query_tokens
        self.num_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, cached: list[Block] = ()) -> list[int] | None:
        """Make room for `num_new_tokens` after the request's computed (and cached) tokens.
        Returns the ids of the blocks appended to its table (the cached ones first), or
        None, changing nothing, when there are not enough free blocks."""
        request_id = request.request_id
        table = self.block_tables.get(request_id)
        if table is None:
            table = self.block_tables[request_id] = []
        num_tokens = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(table) - len(cached)
        added: list[int] = []
        if num_needed > 0 or cached:  # else: room left in its last block (most decodes)
            # Cached blocks sitting in the free queue are taken out of it too.
            num_revived = sum(1 for b in cached if b.ref_count == 0)
            if num_needed + num_revived > self.num_free_blocks:
                if not table:
                    del self.block_tables[request_id]
                return None
            for block in cached:
                self.pool.acquire(block)
            new_blocks = list(cached) + [self.pool.allocate() for _ in range(max(num_needed, 0))]
            table.extend(new_blocks)
            added = [b.block_id for b in new_blocks]
        # Only blocks whose token ids are all known: a token still in flight (asynchronous
        # scheduling) is hashed with its block at a later allocation.
        num_known = min(num_tokens, request.num_tokens)
        if self.enable_prefix_caching and num_known // self.block_size > len(self.block_hashes.get(request_id, ())):
            self._register_full_blocks(request, table, num_known)
        return added

    def _register_full_blocks(self, request: Request, table: list[Block], num_tokens: int) -> None:
        hashes = self.block_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            block_tokens = token_bytes(tokens[i * bs : (i + 1) * bs])
            block_hash = hash_block(hashes[-1] if hashes else None, block_tokens)
            hashes.append(block_hash)
            if table[i].block_hash is None:  # else a prefix-cache hit, registered already
                # Full blocks register in order, so the previous one has its prefix id.
                parent_prefix_id = table[i - 1].prefix_id if i else None
                self.pool.register(table[i], block_hash, parent_prefix_id, block_tokens)

    def free(self, request_id: str) -> None:
        """Release a request's blocks, tail first so that its last blocks are evicted first."""
        for block in reversed(self.block_tables.pop(request_id, [])):
            self.pool.release(block)
        self.block_hashes.pop(request_id, None)

    def check_invariants(self) -> None:
        refs: dict[int, int] = {}
        for table in self.block_tables.values():
            for block in table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            in_free = block.block_id in self.pool.free_queue
            assert in_free == (block.ref_count == 0), f"block {block.block_id}: free={in_free} ref={block.ref_count}"
            assert block.ref_count == refs.get(block.block_id, 0), f"block {block.block_id}: ref count mismatch"
        for block_hash, block_id in self.pool.cached.items():
            block = self.pool.blocks[block_id]
            assert block.block_hash == block_hash and block.token_bytes is not None and block.prefix_id is not None
