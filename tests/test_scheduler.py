"""Continuous batching, chunked prefill and preemption, with fake model outputs."""

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_len=256, prefix=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len),
        KVCacheManager(num_blocks, block_size, prefix),
    )


def make_request(request_id, num_prompt, max_tokens=4, **params) -> Request:
    """Prompts of different requests share no tokens (so no prefix-cache hits between them)."""
    p = SamplingParams(max_tokens=max_tokens, **params)
    p.all_stop_token_ids = {EOS} | set(p.stop_token_ids)
    base = 1000 * (1 + sum(map(ord, request_id)))
    return Request(request_id, [base + i for i in range(num_prompt)], p)


def fake_run(so: SchedulerOutput, scheduler: Scheduler, token=5) -> ModelRunnerOutput:
    """Sample `token` for every request whose step reaches its last known token."""
    sampled = {}
    for s in so.scheduled:
        request = scheduler.requests[s.request_id]
        if s.num_computed_tokens + s.num_scheduled_tokens == request.num_tokens:
            sampled[s.request_id] = token(s.request_id) if callable(token) else token
    return ModelRunnerOutput(sampled_token_ids=sampled)


def run_to_end(scheduler: Scheduler, token=5, max_steps=1000):
    finished, steps = {}, []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        so = scheduler.schedule()
        steps.append(so)
        assert so.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(so.scheduled) <= scheduler.config.max_num_seqs
        for out in scheduler.update(so, fake_run(so, scheduler, token)):
            if out.finished:
                finished[out.request_id] = out
        scheduler.kv.check_invariants()
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks
    return finished, steps


def test_batches_requests_and_finishes_at_max_tokens():
    s = make_scheduler()
    for i in range(3):
        s.add_request(make_request(f"r{i}", 5, max_tokens=4))
    first = s.schedule()
    assert [x.num_scheduled_tokens for x in first.scheduled] == [5, 5, 5]
    assert len(first.new_requests) == 3
    s.update(first, fake_run(first, s))
    second = s.schedule()
    assert [x.num_scheduled_tokens for x in second.scheduled] == [1, 1, 1]  # all decoding together
    assert not second.new_requests
    s.update(second, fake_run(second, s))
    finished, _ = run_to_end(s)
    assert {k: v.finish_reason for k, v in finished.items()} == {f"r{i}": "length" for i in range(3)}


def test_chunked_prefill_shares_steps_with_decodes():
    s = make_scheduler(budget=16)
    s.add_request(make_request("short", 4, max_tokens=20))
    so = s.schedule()
    s.update(so, fake_run(so, s))
    s.add_request(make_request("long", 40, max_tokens=2))
    so = s.schedule()
    # The running decode goes first; the long prompt takes the rest of the budget as a chunk.
    assert [(x.request_id, x.num_scheduled_tokens) for x in so.scheduled] == [("short", 1), ("long", 15)]
    s.update(so, fake_run(so, s))
    so = s.schedule()
    assert [(x.request_id, x.num_scheduled_tokens) for x in so.scheduled] == [("short", 1), ("long", 15)]
    s.update(so, fake_run(so, s))
    so = s.schedule()
    assert [(x.request_id, x.num_scheduled_tokens) for x in so.scheduled] == [("short", 1), ("long", 10)]
    out = s.update(so, fake_run(so, s))
    assert any(o.request_id == "long" and o.new_token_ids for o in out)  # sampled after its last chunk
    run_to_end(s)


def test_sequence_budget_limits_the_batch():
    s = make_scheduler(max_seqs=2, budget=64)
    for i in range(5):
        s.add_request(make_request(f"r{i}", 3))
    so = s.schedule()
    assert len(so.scheduled) == 2 and s.num_waiting == 3
    s.update(so, fake_run(so, s))
    finished, _ = run_to_end(s)
    assert len(finished) == 5


def test_stop_token_and_eos():
    s = make_scheduler()
    s.add_request(make_request("eos", 3, max_tokens=10))
    s.add_request(make_request("stopid", 3, max_tokens=10, stop_token_ids=[9]))
    finished, _ = run_to_end(s, token=lambda rid: EOS if rid == "eos" else 9)
    assert (finished["eos"].finish_reason, finished["eos"].stop_reason) == ("stop", None)
    assert (finished["stopid"].finish_reason, finished["stopid"].stop_reason) == ("stop", 9)


def test_min_tokens_defers_stop():
    s = make_scheduler()
    s.add_request(make_request("r", 3, max_tokens=10, min_tokens=3))
    finished, steps = run_to_end(s, token=EOS)
    assert finished["r"].finish_reason == "stop"
    assert len(steps) == 3  # EOS only counts from the third output token on


def test_preemption_by_recompute_finishes_everything():
    # 12 blocks of 4 tokens; 4 requests of 10 prompt + 12 output tokens need 6 blocks each.
    s = make_scheduler(num_blocks=12, block_size=4, budget=64)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 10, max_tokens=12))
    finished, steps = run_to_end(s)
    assert len(finished) == 4
    assert all(f.finish_reason == "length" for f in finished.values())
    assert s.num_preemptions > 0
    # A preempted request's runner state is dropped and later re-sent whole.
    dropped = set().union(*(so.dropped_request_ids for so in steps))
    assert dropped >= {f"r{i}" for i in range(4)}


def test_preempted_request_returns_to_the_front_and_reuses_its_cached_prefix():
    s = make_scheduler(num_blocks=8, block_size=4, budget=64, max_seqs=4)
    s.add_request(make_request("a", 12, max_tokens=12))
    s.add_request(make_request("b", 12, max_tokens=12))
    preempted_seen = False
    while s.has_unfinished_requests():
        so = s.schedule()
        new_ids = {n.request_id for n in so.new_requests}
        for x in so.scheduled:
            if x.request_id in new_ids and x.num_computed_tokens > 0:
                preempted_seen = True  # resumed with a prefix-cache hit
        s.update(so, fake_run(so, s))
        s.kv.check_invariants()
    assert s.num_preemptions > 0 and preempted_seen
    assert s.kv.num_free_blocks == 8


def test_refuses_requests_that_can_never_fit():
    s = make_scheduler(max_len=32)
    with pytest.raises(ValueError, match="prompt has 40 tokens, max_model_len is 32"):
        s.add_request(make_request("big", 40))
    with pytest.raises(ValueError, match="lower max_tokens to at most 12"):
        s.add_request(make_request("long", 20, max_tokens=30))
    assert not s.has_unfinished_requests()


def test_abort_frees_blocks_of_running_and_waiting():
    s = make_scheduler(max_seqs=1)
    s.add_request(make_request("run", 8))
    s.add_request(make_request("wait", 8))
    so = s.schedule()
    s.update(so, fake_run(so, s))
    s.abort(["run", "wait"])
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert s.schedule().dropped_request_ids == {"run", "wait"}
