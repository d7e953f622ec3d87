"""StructuredOutputManager: the engine core's grammar side, one object per engine.

    add_request(id, params)  compile in a thread pool (cached per grammar: the compiler
                             belongs to one tokenizer), so the engine loop never waits
    is_ready / error         the engine schedules a request only once its grammar is ready;
                             a compile error or time-out finishes it with that message
    fill_bitmask(ids)        the next-token bitmask of each request (all ones without one)
    accept_tokens(id, ids)   advance its matcher by the tokens it sampled
    is_terminated(id)        its grammar reached its end (the request stops)
    remove(id)               forget it
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import xgrammar as xgr

from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.grammar import GrammarError, build_grammar, clean_message

logger = logging.getLogger("pagedllm")

COMPILE_TIMEOUT_S = 30.0  # a grammar still compiling after this fails its request
_CACHE_SIZE = 256  # compiled grammars kept (LRU)


@dataclass
class _Entry:
    future: Future  # -> xgr.CompiledGrammar
    added: float
    matcher: xgr.GrammarMatcher | None = None
    error: str | None = None


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None, timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagedllm-grammar")
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._requests: dict[str, _Entry] = {}
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))

    # -- compiling ---------------------------------------------------------------------------

    def add_request(self, request_id: str, params: StructuredOutputsParams) -> None:
        self._requests[request_id] = _Entry(self._compile(params), time.monotonic())

    def _compile(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        future = self._compiled.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._compiled.move_to_end(key)
            return future
        future = self._pool.submit(self._compile_now, params)
        self._compiled[key] = future
        while len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return future

    def _compile_now(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        grammar = build_grammar(params)
        try:
            return self._compiler.compile_grammar(grammar)
        except RuntimeError as e:
            raise GrammarError(f"the grammar does not compile: {clean_message(e)}") from e

    def is_ready(self, request_id: str) -> bool:
        """Compiled (a matcher exists) or failed (error() says why): either way, decided."""
        entry = self._requests[request_id]
        if entry.matcher is not None or entry.error is not None:
            return True
        if not entry.future.done():
            if time.monotonic() - entry.added > self.timeout_s:
                entry.error = f"the grammar did not compile within {self.timeout_s:.0f} s: simplify the schema or grammar"
                return True
            return False
        exception = entry.future.exception()
        if exception is not None:
            entry.error = str(exception) if isinstance(exception, GrammarError) else f"{type(exception).__name__}: {exception}"
        else:
            entry.matcher = xgr.GrammarMatcher(entry.future.result())
        return True

    def error(self, request_id: str) -> str | None:
        entry = self._requests.get(request_id)
        return None if entry is None else entry.error

    def wait(self, timeout_s: float) -> None:
        """Block up to timeout_s for any compile in flight to finish (an idle engine's wait)."""
        pending = [e.future for e in self._requests.values() if not e.future.done()]
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    # -- decoding ----------------------------------------------------------------------------

    def fill_bitmask(self, request_ids: list[str]) -> np.ndarray:
        """int32 [len(request_ids), ceil(vocab / 32)]: bit t % 32 of word t // 32 allows token t."""
        if self._bitmask.shape[0] < len(request_ids):
            self._bitmask = xgr.allocate_token_bitmask(max(len(request_ids), 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[: len(request_ids)]
        bitmask.fill_(-1)
        matchers, rows = [], []
        for row, request_id in enumerate(request_ids):
            entry = self._requests.get(request_id)
            if entry is not None and entry.matcher is not None and not entry.matcher.is_terminated():
                matchers.append(entry.matcher)
                rows.append(row)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(self._bitmask, rows[0])
        elif matchers:  # rows filled in parallel by xgrammar's threads
            self._batch.batch_fill_next_token_bitmask(matchers, self._bitmask, rows)
        return bitmask.numpy().copy()

    def accept_tokens(self, request_id: str, token_ids: list[int]) -> bool:
        """Advance the request's matcher; False if a token breaks the grammar (logged)."""
        entry = self._requests.get(request_id)
        if entry is None or entry.matcher is None:
            return True
        for token in token_ids:
            if entry.matcher.is_terminated() or not entry.matcher.accept_token(token):
                logger.warning("request %s: token %d does not fit its grammar", request_id, token)
                return False
        return True

    def is_terminated(self, request_id: str) -> bool:
        entry = self._requests.get(request_id)
        return entry is not None and entry.matcher is not None and entry.matcher.is_terminated()

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
