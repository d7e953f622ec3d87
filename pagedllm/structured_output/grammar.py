"""From StructuredOutputsParams to an xgrammar Grammar, and the tokenizer-free validation
the front end does before a request reaches the engine."""

from __future__ import annotations

import json
import re

import xgrammar as xgr

from pagedllm.sampling_params import StructuredOutputsParams

# Compact JSON (no free whitespace): a small model given free whitespace can fill its
# whole budget with newlines; compact output also costs fewer tokens.
_JSON_OPTIONS = dict(any_whitespace=False, strict_mode=True)
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The schema, regex or grammar does not compile (the message is the compiler's)."""


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar of `params`; raises GrammarError with the compiler's message."""
    kind, _ = params.key
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(_schema_text(params.json), **_JSON_OPTIONS)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', **_JSON_OPTIONS)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise GrammarError(f"invalid structured output {kind}: {clean_message(e)}") from e


def validate(params: StructuredOutputsParams) -> None:
    """Raise GrammarError if `params` cannot compile (no tokenizer needed)."""
    build_grammar(params)


def clean_message(error: BaseException) -> str:
    """xgrammar's C++ message without its timestamp and source location."""
    return _CPP_PREFIX.sub("", str(error).strip()).strip()


def _schema_text(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"invalid structured output json: the schema is not valid JSON ({e})") from e
        return schema
    return json.dumps(schema)


def _ebnf_literal(text: str) -> str:
    """A quoted EBNF string matching exactly `text` (JSON escapes are EBNF escapes)."""
    return json.dumps(text, ensure_ascii=False)
