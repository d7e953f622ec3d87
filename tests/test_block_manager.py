"""The block manager's bookkeeping and invariants, without a model."""

import pytest

from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, request: Request) -> int:
    """What the scheduler does on admission; returns the cached token count."""
    cached = kv.find_cached_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - len(cached) * kv.block_size, cached) is not None
    request.num_computed_tokens = request.num_tokens
    return len(cached) * kv.block_size


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a", list(range(10))), make_request("b", list(range(100, 105)))
    admit(kv, a)
    admit(kv, b)
    assert kv.block_ids("a") and len(kv.block_ids("a")) == 3 and len(kv.block_ids("b")) == 2
    assert not set(kv.block_ids("a")) & set(kv.block_ids("b"))
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_blocks == 8


def test_growing_by_one_token_allocates_only_at_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = make_request("r", [1, 2, 3])
    admit(kv, r)
    assert len(kv.block_ids("r")) == 1
    r.all_token_ids.append(4)  # 4 tokens: still one block
    assert kv.allocate_slots(r, 1) == []  # room left in its block
    r.num_computed_tokens += 1
    assert len(kv.block_ids("r")) == 1
    r.all_token_ids.append(5)
    assert kv.allocate_slots(r, 1) == kv.block_ids("r")[1:]  # one new block, returned
    assert len(kv.block_ids("r")) == 2
    kv.check_invariants()


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(12))  # exactly three full blocks
    first = make_request("first", prompt)
    assert admit(kv, first) == 0
    second = make_request("second", prompt)
    # All 12 tokens are cached, but the last must be recomputed for its logits:
    # the hit stops one block short.
    assert admit(kv, second) == 8
    assert kv.block_ids("second")[:2] == kv.block_ids("first")[:2]
    assert kv.block_ids("second")[2] != kv.block_ids("first")[2]  # a shared block is never written
    kv.check_invariants()
    kv.free("first")
    kv.free("second")
    kv.check_invariants()
    assert kv.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(9)))  # 2 full blocks + 1 partial = 3 blocks
    admit(kv, a)
    kv.free("a")
    again = make_request("a2", list(range(9)))
    assert admit(kv, again) == 8  # revived from the free queue
    kv.free("a2")
    # Something else needs all 4 blocks: the cached ones are evicted.
    other = make_request("o", list(range(100, 116)))
    assert admit(kv, other) == 0
    kv.free("o")
    assert admit(kv, make_request("a3", list(range(9)))) == 0
    kv.check_invariants()


def test_different_prefix_same_block_tokens_do_not_collide():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block has the same tokens as a's second block, but a different first block.
    assert admit(kv, make_request("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])) == 0


def test_out_of_blocks_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_request("r", list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert kv.num_free_blocks == 2 and "r" not in kv.block_tables
    kv.check_invariants()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(12))))
    assert admit(kv, make_request("b", list(range(12)))) == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_random_workload_keeps_invariants(block_size):
    import random

    rng = random.Random(block_size)
    kv = KVCacheManager(num_blocks=64, block_size=block_size)
    live: list[Request] = []
    for step in range(300):
        if live and rng.random() < 0.4:
            kv.free(live.pop(rng.randrange(len(live))).request_id)
        else:
            base = rng.choice([[1] * 20, [2] * 7, []])
            r = make_request(f"r{step}", base + [rng.randrange(50) for _ in range(rng.randrange(1, 30))])
            cached = kv.find_cached_prefix(r)
            if kv.allocate_slots(r, r.num_tokens - len(cached) * block_size, cached) is not None:
                live.append(r)
        kv.check_invariants()
    for r in live:
        kv.free(r.request_id)
    kv.check_invariants()
    assert kv.num_free_blocks == 64
