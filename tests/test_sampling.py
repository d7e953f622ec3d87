"""SamplingParams validation, the sampler's rules, and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.layers.sampler import Sampler, SamplingBatch, apply_top_k_top_p
from pagedllm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -0.5, "at least 0.0"),
        ("top_p", 0.0, r"in \(0, 1\]"),
        ("top_k", -2, "-1, 0"),
        ("min_p", 1.5, r"in \[0, 1\]"),
        ("n", 0, "at least 1"),
        ("max_tokens", 0, "at least 1"),
        ("presence_penalty", 3.0, r"in \[-2, 2\]"),
        ("frequency_penalty", -2.5, r"in \[-2, 2\]"),
        ("repetition_penalty", 0.0, "greater than 0"),
        ("logprobs", -1, "at least 0"),
    ],
)
def test_invalid_values_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field} must be {allowed}"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def batch(rows: int, **overrides) -> SamplingBatch:
    fields = dict(
        temperature=torch.ones(rows), all_greedy=False, top_k=None, top_p=None, min_p=None,
        presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
        prompt_token_ids=[], output_token_ids=[], seeds={}, masked_token_ids={}, max_num_logprobs=None,
    )
    fields.update(overrides)
    return SamplingBatch(**fields)


def test_top_k_one_and_greedy_agree_with_argmax():
    logits = torch.randn(4, 50)
    top1 = Sampler("cpu")(logits.clone(), batch(4, top_k=torch.ones(4, dtype=torch.int64)))
    greedy = Sampler("cpu")(logits.clone(), batch(4, temperature=torch.zeros(4)))
    assert torch.equal(top1.sampled_token_ids, logits.argmax(-1))
    assert torch.equal(greedy.sampled_token_ids, logits.argmax(-1))


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_top_k_top_p(logits, None, torch.tensor([0.7])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.35, 0.05]])).repeat(200, 1)
    out = Sampler("cpu")(logits, batch(200, min_p=torch.full((200,), 0.2)))
    assert 2 not in out.sampled_token_ids.tolist()


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 100)
    alone = Sampler("cpu")(logits[1:2].clone(), batch(1, seeds={0: 42})).sampled_token_ids
    together = Sampler("cpu")(logits.clone(), batch(3, seeds={1: 42})).sampled_token_ids
    assert together[1] == alone[0]


def test_penalties_push_away_from_seen_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    out = Sampler("cpu")(
        logits,
        batch(
            1, temperature=torch.zeros(1), all_greedy=True, presence_penalty=torch.tensor([2.0]),
            frequency_penalty=torch.tensor([0.0]), repetition_penalty=torch.tensor([1.0]),
            prompt_token_ids=[[1]], output_token_ids=[[3]],
        ),
    )
    assert out.sampled_token_ids.item() != 3
    rep = Sampler("cpu")(
        torch.tensor([[2.0, 1.9]]),
        batch(
            1, temperature=torch.zeros(1), all_greedy=True, presence_penalty=torch.tensor([0.0]),
            frequency_penalty=torch.tensor([0.0]), repetition_penalty=torch.tensor([1.2]),
            prompt_token_ids=[[0]], output_token_ids=[[]],
        ),
    )
    assert rep.sampled_token_ids.item() == 1  # 2.0 / 1.2 < 1.9


def test_logprobs_have_ranks_and_top_k():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    out = Sampler("cpu")(logits, batch(1, temperature=torch.zeros(1), all_greedy=True, max_num_logprobs=2))
    lp = out.logprobs
    assert lp.token_ids.tolist() == [[0, 0, 2]] and lp.ranks.tolist() == [1]
    assert torch.allclose(lp.logprobs[0, 0], logits.log_softmax(-1)[0, 0])


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.loader.gguf import find_bundled_model, load_gguf_config_and_tokenizer

    return load_gguf_config_and_tokenizer(find_bundled_model()).tokenizer


@pytest.mark.parametrize("text", ["héllo wörld", "世界你好，这是一个测试。", "emoji 🙂🚀 and ümlauts", "tabs\tand\nnewlines  "])
def test_incremental_detokenization_is_exact_for_multibyte_text(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    pieces = []
    for token in ids:
        before = detok.text
        detok.add(token)
        assert "\ufffd" not in detok.text  # never a half character
        pieces.append(detok.text[len(before) :])
    assert "".join(pieces) == tokenizer.decode(ids) == detok.text


def test_stop_string_across_tokens_is_found_and_cut(tokenizer):
    ids = tokenizer.encode("The answer is forty-two, of course.")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["two,"]))
    found = None
    for token in ids:
        found = found or detok.add(token)
        if found:
            break
    assert found == "two," and detok.text == "The answer is forty-"
    assert detok.text_to_send(finished=True) == detok.text
