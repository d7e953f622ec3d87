"""The grammar side of structured outputs, without a model: validation messages, the
manager (compile, cache, bitmask, matchers) with the bundled model's tokenizer, and the
sampler's bitmask application."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from model_utils import tokenizer_dir  # noqa: F401  (fixture)

from pagedllm.layers.sampler import apply_token_bitmask
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.grammar import GrammarError, validate

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def manager(tokenizer):
    from pagedllm.structured_output.manager import StructuredOutputManager

    manager = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    yield manager
    manager.shutdown()


def _ready(manager, request_id: str) -> None:
    deadline = time.monotonic() + 60
    while not manager.is_ready(request_id):
        assert time.monotonic() < deadline
        time.sleep(0.002)


def _allowed(row: np.ndarray, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(json={"type": "nonsense"}), 'Unsupported type "nonsense"'),
        (dict(json="{not json"), "not valid JSON"),
        (dict(regex="a[b"), "Unclosed '\\['"),
        (dict(grammar='root ::= "a" | '), "EBNF parser error"),
    ],
)
def test_invalid_grammars_fail_with_the_compilers_message(params, message):
    with pytest.raises(GrammarError, match=message):
        validate(StructuredOutputsParams(**params))


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()


def test_manager_walks_a_json_schema_and_terminates(manager, tokenizer):
    manager.add_request("a", StructuredOutputsParams(json=SCHEMA))
    _ready(manager, "a")
    assert manager.error("a") is None
    first = manager.fill_bitmask(["a", "unconstrained"])
    assert first.dtype == np.int32 and first.shape == (2, (len(tokenizer) + 31) // 32)
    assert (first[1] == -1).all()  # a request without a grammar: everything allowed
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    word = tokenizer.encode("Hello", add_special_tokens=False)[0]
    assert _allowed(first[0], brace) and not _allowed(first[0], word)
    for token in tokenizer.encode('{"name": "Bob", "age": 3}', add_special_tokens=False):
        assert _allowed(manager.fill_bitmask(["a"])[0], token)
        assert manager.accept_tokens("a", [token])
    done = manager.fill_bitmask(["a"])[0]
    assert np.unpackbits(done.view(np.uint8)).sum() == 1 and _allowed(done, tokenizer.eos_token_id)
    assert not manager.is_terminated("a")
    assert manager.accept_tokens("a", [tokenizer.eos_token_id]) and manager.is_terminated("a")
    manager.remove("a")
    assert not manager.has_request("a")


def test_compiled_grammars_are_cached(manager):
    params = StructuredOutputsParams(json={**SCHEMA, "title": "cache-test"})
    manager.add_request("first", params)
    _ready(manager, "first")
    start = time.perf_counter()
    manager.add_request("second", params)
    assert manager.is_ready("second") and manager.error("second") is None  # no compile: ready at once
    assert time.perf_counter() - start < 0.05
    manager.remove("first")
    manager.remove("second")


def test_choice_and_compile_errors(manager, tokenizer):
    manager.add_request("c", StructuredOutputsParams(choice=["yes", "no"]))
    manager.add_request("bad", StructuredOutputsParams(regex="(unclosed"))
    _ready(manager, "c")
    _ready(manager, "bad")
    assert "regex" in manager.error("bad")
    row = manager.fill_bitmask(["c"])[0]
    assert _allowed(row, tokenizer.encode("yes", add_special_tokens=False)[0])
    assert not _allowed(row, tokenizer.encode("maybe", add_special_tokens=False)[0])
    manager.remove("c")
    manager.remove("bad")


def test_apply_token_bitmask_masks_forbidden_tokens():
    logits = torch.randn(2, 70)
    bitmask = np.full((2, 3), -1, dtype=np.int32)
    bitmask[0] = 0
    bitmask[0, 1] = 1 << 5  # only token 37
    apply_token_bitmask(logits, torch.from_numpy(bitmask))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [37]
    assert torch.isfinite(logits[1]).all()


def test_offline_generate_with_structured_outputs(llm):
    """Through the whole engine (chunked prefill, async steps): outputs match their constraint."""
    import json

    import jsonschema

    from pagedllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}], add_generation_prompt=True, tokenize=False)
    person = {**SCHEMA, "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=40, structured_outputs=StructuredOutputsParams(json=person)) for i in range(3)
    ] + [
        SamplingParams(temperature=0, max_tokens=10, structured_outputs=StructuredOutputsParams(choice=["cat", "dog"])),
        SamplingParams(temperature=0, max_tokens=12),  # unconstrained, in the same steps
    ]
    outputs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    for output in outputs[:3]:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        jsonschema.validate(json.loads(output.outputs[0].text), person)
    assert outputs[3].outputs[0].text in ("cat", "dog")
    assert outputs[4].outputs[0].text and not outputs[4].outputs[0].text.startswith("{")
    with pytest.raises(ValueError, match="Unclosed"):
        llm.generate([prompt], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a[")), use_tqdm=False)
