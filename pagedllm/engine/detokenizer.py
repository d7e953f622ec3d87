"""Incremental detokenization and stop strings for one sequence.

Decoding token by token breaks on two things: a multi-byte character split over
several tokens (the partial text ends in U+FFFD), and tokenizers whose pieces
decode differently at the start of a text (SentencePiece drops a leading
space). Both are handled by decoding a short window of tokens before the new
ones and emitting only what the window gained:

    ids:  ... p p p [prefix_offset  ... read_offset) new new
    new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

and by waiting while the result still ends in U+FFFD.
"""

from __future__ import annotations

from pagedllm.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""
        # Streaming holds back what could still turn out to be the start of a stop string.
        stops = params.stop or []
        self.holdback = 0 if params.include_stop_str_in_output or not stops else max(map(len, stops)) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def add(self, token_id: int, may_stop: bool = True) -> str | None:
        """Append a token; returns the stop string if the text now contains one (the
        text is then cut at it, or after it with include_stop_str_in_output)."""
        if self.tokenizer is None:  # skip_tokenizer_init: token ids only
            return None
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new_text
        return self._find_stop(len(new_text)) if may_stop else None

    def _find_stop(self, num_new_chars: int) -> str | None:
        for stop in self.params.stop or []:
            # Only where the new text could complete it.
            start = max(len(self.text) - num_new_chars - len(stop) + 1, 0)
            index = self.text.find(stop, start)
            if index >= 0:
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                return stop
        return None

    def text_to_send(self, finished: bool) -> str:
        """The text a stream may send now (all of it once finished)."""
        return self.text if finished or not self.holdback else self.text[: max(len(self.text) - self.holdback, 0)]
