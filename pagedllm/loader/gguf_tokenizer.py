"""Build a Hugging Face fast tokenizer from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: only the vocabulary, the merges, the token types, the special
token ids and the name of the pre-tokenizer (`tokenizer.ggml.pre`) the model was trained with. We
rebuild the byte-level BPE from those in one pass (transformers' converter takes ~4 s, most of it
re-parsing the 49k-entry vocabulary).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast  # ~1 s: this module is imported when a tokenizer is built

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFTokenizer(PreTrainedTokenizerFast):
    """A PreTrainedTokenizerFast over a backend built here. Given as `tokenizer_object`, the backend would be
    deep-copied (serialized and parsed again: ~0.15 s for SmolLM2's 49k tokens); setting `_tokenizer` before
    `__init__`, as transformers' own tokenizer classes (GPT2Tokenizer, ...) do, hands it over as it is.
    Saved, it reloads as transformers' TokenizersBackend."""

    def __init__(self, backend: Tokenizer, **kwargs: Any) -> None:
        self._tokenizer = backend
        super().__init__(**kwargs)


def _gpt2_byte_level():
    """GPT-2's split regex, then bytes -> printable characters."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level():
    """StarCoder's tokenizer.json (SmolLM, SmolLM2 reuse it): every digit on its own, then GPT-2's.

    llama.cpp's "smollm"/"starcoder" regexes, `\\p{N}` then GPT-2's, do the same. transformers'
    GGUF converter does not know these names and drops the digit split, which changes the ids of
    whitespace runs in front of a digit ("a  1", "\\n\\n1.").
    """
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_byte_level()])


# Qwen2's tokenizer.json (Qwen2.5, Qwen3 too): GPT-2's contractions and words, but every digit alone.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen2_split_then_byte_level():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer that model's tokenizer.json uses. Add entries here.
PRE_TOKENIZERS = {
    "default": _gpt2_byte_level,
    "gpt-2": _gpt2_byte_level,
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
    "qwen2": _qwen2_split_then_byte_level,
}
# tokenizer.ggml.pre -> the normalizer of that model's tokenizer.json, where it has one. Qwen2's
# composes Unicode (NFC) first; transformers' GGUF converter leaves that out, which only shows on
# decomposed text ("e" + U+0301), where ours gives the ids the model was trained on.
NORMALIZERS = {"qwen2": normalizers.NFC}


def build_tokenizer(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF describes, with its special tokens and chat template: byte-level BPE
    (tokenizer.ggml.model "gpt2") or Gemma's SentencePiece-style BPE ("llama" in a gemma file)."""
    kind, architecture = metadata.get("tokenizer.ggml.model"), metadata.get("general.architecture", "")
    tokens = metadata["tokenizer.ggml.tokens"]
    if kind == "gpt2":
        backend = _byte_level_bpe(metadata)
    elif kind == "llama" and architecture.startswith("gemma"):
        tokens = _gemma_spelling(tokens)
        backend = _gemma_bpe(metadata, tokens)
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} of a {architecture!r} file is not supported yet; pagedllm builds 'gpt2' "
            f"(byte-level BPE) and Gemma's 'llama' (SentencePiece-style BPE). Pass tokenizer= an HF tokenizer folder."
        )
    # Control tokens (<|im_start|>, <start_of_turn>) and user-defined ones must match whole, never be cut by BPE.
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    added = [
        AddedToken(token, special=token_type == _CONTROL, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    return GGUFTokenizer(
        backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        # GemmaTokenizer's mask token, which the file does not name.
        **({"mask_token": "<mask>"} if kind == "llama" and "<mask>" in tokens else {}),
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"),
        add_eos_token=metadata.get("tokenizer.ggml.add_eos_token", False),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet; known: {sorted(PRE_TOKENIZERS)}.")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    if pre in NORMALIZERS:
        backend.normalizer = NORMALIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend


def _gemma_spelling(tokens: list[str]) -> list[str]:
    """Tokens of only spaces are stored with real spaces ("  "); the normalized text spells them "▁▁"."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _gemma_bpe(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """Gemma's tokenizer.json, rebuilt: BPE over "▁"-for-space text with byte fallback.

    The file has no merges, so they are recovered from the vocabulary as transformers does: every
    split of a token into two tokens is a merge, ranked by the token's place in the file (Gemma's
    scores do not follow its merge order), longer left pieces first. `tokens` are respelled
    (_gemma_spelling).
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token in sorted(vocab, key=vocab.__getitem__):  # each distinct token once, at its (last) place
        merges.extend((token[:i], token[i:]) for i in range(len(token) - 1, 0, -1) if token[:i] in vocab and token[i:] in vocab)
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, unk_token=None if unk is None else tokens[unk], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend
