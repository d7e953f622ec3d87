"""The block manager's bookkeeping and invariants, without a model."""

import random

import pytest

from pagedllm.core import block_manager
from pagedllm.core.block_hash import hash_block, token_bytes
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


def constant_hash(monkeypatch) -> None:
    """Every block gets the same key: the worst a weak hash could do."""
    monkeypatch.setattr(block_manager, "hash_block", lambda *args, **kwargs: b"\x01" * 32)


def assert_tables_hold_their_tokens(kv: KVCacheManager, requests: list[Request]) -> None:
    """What sharing must never break: every registered block in a request's table holds that
    request's tokens at that position, after the block that precedes it there."""
    bs = kv.block_size
    for r in requests:
        table = kv.block_tables.get(r.request_id, [])
        for i, block in enumerate(table):
            if block.block_hash is not None:
                assert block.token_bytes == token_bytes(r.all_token_ids[i * bs : (i + 1) * bs])
                assert block.parent_prefix_id == (table[i - 1].prefix_id if i else None)


def test_keys_are_sha256_of_the_prefix():
    a, b = token_bytes([1, 2, 3, 4]), token_bytes([5, 6, 7, 8])
    assert len(hash_block(None, a)) == 32
    assert hash_block(hash_block(None, a), b) != hash_block(hash_block(None, b), b)
    assert hash_block(None, a) != hash_block(None, a, extra_keys=b"lora-1")
    assert hash_block(None, a) == hash_block(None, token_bytes((1, 2, 3, 4)))


def test_colliding_keys_are_never_shared(monkeypatch):
    constant_hash(monkeypatch)
    kv = KVCacheManager(num_blocks=16, block_size=4)
    x, y, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = make_request("a", x + y + [0])
    assert admit(kv, a) == 0
    assert admit(kv, make_request("other first block", w + y + [0])) == 0
    # The same tokens one block deeper (another position, another prefix) is no hit either.
    assert admit(kv, make_request("x twice", x + x + [0])) == 4
    # A real hit still works where the colliding key points at the right block.
    assert admit(kv, make_request("a again", x + y + [0])) == 4
    kv.check_invariants()
    assert_tables_hold_their_tokens(kv, [a])


@pytest.mark.parametrize("hash_kind", ["sha256", "constant"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_random_workload_keeps_invariants(block_size, hash_kind, monkeypatch):
    if hash_kind == "constant":
        constant_hash(monkeypatch)
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
        assert_tables_hold_their_tokens(kv, live)
    for r in live:
        kv.free(r.request_id)
    kv.check_invariants()
    assert kv.num_free_blocks == 64


def test_outputs_stay_correct_when_every_key_collides(llm, hf_model, monkeypatch):
    """The engine with a constant block key: no request is served another prefix's K/V."""
    from reference import check_logprobs_close, hf_greedy

    from pagedllm import SamplingParams

    constant_hash(monkeypatch)
    tok = llm.get_tokenizer()
    block = tok.encode("The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat")[:16]
    prompts = [
        "Once upon a time, in a small village by the sea, there lived an old fisherman",
        "The capital of France is a city of light, art and food. Its most famous tower is",
        block + block + tok.encode(" and so"),  # one block's tokens again, one block deeper
        "Once upon a time, in a small village by the sea, there lived an old fisherman",
    ]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    outputs = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]  # one by one: the cache fills
    assert outputs[-1].num_cached_tokens == 16  # the first block's true hit still serves
    for output in outputs:
        hf_tokens, hf_logprobs = hf_greedy(hf_model, output.prompt_token_ids, 6)
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs)
