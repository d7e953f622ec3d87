"""Asynchronous scheduling (step N+1 scheduled and launched before step N's tokens are read)
gives exactly the outputs of the synchronous loop, and frees every block.

Each case runs the same requests through two engines on the bundled model in fp32, one with
async_scheduling "on" and one "off", and compares every token, logprob and finish reason.
"""

from __future__ import annotations

import os

import pytest

from pagedllm import SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 3,
    "List three colors:",
    "Q: What is 12 + 30?\nA:",
]
SHARED = "You are a helpful assistant. Answer briefly and truthfully. " * 4  # > 2 blocks


def make_llm(mode: str, **kwargs):
    """The bundled model (or PAGEDLLM_TEST_MODEL's file: the same checks run on a GPU machine)."""
    from pagedllm import LLM

    kwargs.setdefault("model", os.environ.get("PAGEDLLM_TEST_MODEL"))
    options = dict(dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, kv_cache_memory="64MiB", max_model_len=512)
    options.update(kwargs)
    return LLM(async_scheduling=mode, **options)


@pytest.fixture(scope="module")
def engines():
    return {mode: make_llm(mode) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def small_cache_engines():
    # 12 blocks of 16 tokens (a float32 cache): six requests of ~10 + 40 tokens need 18, so some are preempted.
    size = 12 * 16 * 30 * 2 * 3 * 64 * 4
    return {
        mode: make_llm(mode, kv_cache_memory=size, kv_cache_dtype="float32", max_model_len=160, enable_prefix_caching=False)
        for mode in ("on", "off")
    }


def summary(outputs):
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.text, [sorted(d.items()) for d in c.logprobs or []]) for c in o.outputs]
        for o in outputs
    ]


def assert_all_free(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    kv = engine.core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks


def run_both(engines, prompts, params):
    results = {}
    for mode, llm in engines.items():
        results[mode] = llm.generate(prompts, params, use_tqdm=False)
        assert_all_free(llm)
    return results["on"], results["off"]


def logprob_summary(outputs):
    return [[[{t: round(lp.logprob, 4) for t, lp in d.items()} for d in c.logprobs] for c in o.outputs] for o in outputs]


def test_greedy_with_chunked_prefill_and_logprobs(engines):
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    on, off = run_both(engines, PROMPTS, params)
    assert [[c.token_ids for c in o.outputs] for o in on] == [[c.token_ids for c in o.outputs] for o in off]
    assert [[c.finish_reason for c in o.outputs] for o in on] == [[c.finish_reason for c in o.outputs] for o in off]
    assert logprob_summary(on) == logprob_summary(off)


def test_prefix_cache_hits(engines):
    prompts = [SHARED + q for q in ("What is 2+2?", "Name a fruit.", "Say hi.")]
    params = SamplingParams(temperature=0, max_tokens=16)
    for llm in engines.values():  # warm the cache with the shared prefix
        llm.generate([SHARED + "Hello"], params, use_tqdm=False)
    on, off = run_both(engines, prompts, params)
    assert all(o.num_cached_tokens >= 32 for o in on + off)
    assert summary(on) == summary(off)


def test_n_and_seeded_sampling(engines):
    params = [
        SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=7, max_tokens=20),
        SamplingParams(temperature=1.0, top_k=20, seed=123, max_tokens=20),
        SamplingParams(n=2, temperature=0, max_tokens=20),
    ]
    on, off = run_both(engines, PROMPTS[:3], params)
    assert summary(on) == summary(off)
    assert len({tuple(c.token_ids) for c in on[0].outputs}) > 1  # the samples differ from each other


def test_stop_strings_tokens_and_min_tokens(engines):
    tok = engines["on"].get_tokenizer()
    params = [
        SamplingParams(temperature=0, max_tokens=40, stop=["\n"]),
        SamplingParams(temperature=0, max_tokens=40, stop=[" the", "."], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok.encode(",")[0]]),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=8),
    ]
    on, off = run_both(engines, PROMPTS[:4], params)
    assert summary(on) == summary(off)
    assert {o.outputs[0].finish_reason for o in on} >= {"stop"}


def test_penalties_run_synchronously_with_the_same_output(engines):
    params = [
        SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=24, presence_penalty=0.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=24),
    ]
    on, off = run_both(engines, PROMPTS[:3], params)
    assert summary(on) == summary(off)


def test_preemption(small_cache_engines):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    on, off = run_both(small_cache_engines, PROMPTS[:3] + PROMPTS[4:], params)
    assert small_cache_engines["on"].engine.core.scheduler.num_preemptions > 0
    assert summary(on) == summary(off)


def test_abort_while_a_step_is_in_flight(engines):
    """Abort requests whose next step is already launched: their blocks come free, nothing
    more reaches their outputs, and the other requests' outputs are unchanged."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    finals = {}
    for mode, llm in engines.items():
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"{mode}-{i}", prompt, params)
        seen: dict[str, list[int]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            if steps == 6:
                if mode == "on":
                    assert engine.core.in_flight is not None  # the abort lands while a step runs
                engine.abort_request(f"{mode}-1")
                engine.abort_request(f"{mode}-4")
                aborted_at = {rid: len(seen.get(rid, [])) for rid in (f"{mode}-1", f"{mode}-4")}
        for rid, count in aborted_at.items():
            assert len(seen.get(rid, [])) == count  # nothing after the abort
        finals[mode] = {rid.split("-")[1]: tokens for rid, tokens in seen.items() if rid.split("-")[1] not in ("1", "4")}
        assert_all_free(llm)
    assert finals["on"] == finals["off"]
    assert all(len(tokens) == 30 for tokens in finals["on"].values())


def test_structured_outputs_and_logit_bias(engines):
    """Grammar masks for step N+1 are built from step N's tokens while N+1's forward runs."""
    from pagedllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    params = [
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=30, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,5}")),
        SamplingParams(temperature=0, max_tokens=12, logit_bias={11: 5.0, 13: -100.0}),
        SamplingParams(temperature=0, max_tokens=12),
    ]
    on, off = run_both(engines, PROMPTS[:5], params)
    assert summary(on) == summary(off)
    assert on[2].outputs[0].finish_reason == "stop" and on[2].outputs[0].text[3] == "-"
    assert 13 not in on[3].outputs[0].token_ids
