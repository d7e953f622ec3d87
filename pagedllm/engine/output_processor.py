"""Turns EngineCoreOutputs into RequestOutputs: detokenizes, applies stop
strings, builds logprob dicts, and gathers the n completions of a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.interface import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.input_processor import child_id
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class _Sequence:
    """One completion of a request."""

    index: int
    detokenizer: IncrementalDetokenizer
    output: CompletionOutput


@dataclass
class _RequestState:
    output: RequestOutput
    params: SamplingParams
    sequences: dict[str, _Sequence] = field(default_factory=dict)  # core request id -> completion


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self.parent_of: dict[str, str] = {}  # core request id -> user request id

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> list[str]:
        """Track a request; returns the core request ids of its completions."""
        output = RequestOutput(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_ids,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            outputs=[],
            finished=False,
        )
        state = _RequestState(output, params)
        for i in range(params.n):
            core_id = request_id if params.n == 1 else child_id(request_id, i)
            completion = CompletionOutput(
                index=i,
                text="",
                token_ids=[],
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            state.sequences[core_id] = _Sequence(i, IncrementalDetokenizer(self.tokenizer, prompt_ids, params), completion)
            output.outputs.append(completion)
            self.parent_of[core_id] = request_id
        self.requests[request_id] = state
        return list(state.sequences)

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs that changed, and the core request ids that hit a
        stop string (the caller aborts them in the core)."""
        changed: dict[str, RequestOutput] = {}
        to_abort: list[str] = []
        for out in core_outputs:
            parent = self.parent_of.get(out.request_id)
            if parent is None:
                continue  # already finished here (stop string) and aborted
            state = self.requests[parent]
            seq = state.sequences[out.request_id]
            if out.prompt_logprobs is not None and seq.index == 0:
                state.output.prompt_logprobs.extend(self._logprob_dicts(out.prompt_logprobs))
            state.output.num_cached_tokens = out.num_cached_tokens
            stop_string = self._append(seq, out, state.params)
            if stop_string is not None and not out.finished:
                to_abort.append(out.request_id)
            if stop_string is not None or out.finished:
                self._finish(seq, out, stop_string)
                del self.parent_of[out.request_id]
            changed[parent] = state.output
            if all(s.output.finish_reason is not None for s in state.sequences.values()):
                state.output.finished = True
                del self.requests[parent]
        return list(changed.values()), to_abort

    def _append(self, seq: _Sequence, out: EngineCoreOutput, params: SamplingParams) -> str | None:
        stop_string = None
        completion = seq.output
        # A stop token (EOS or one of stop_token_ids) ends the sequence without becoming text.
        token_stop = out.finish_reason == "stop" and not params.include_stop_str_in_output
        for i, token in enumerate(out.new_token_ids):
            completion.token_ids.append(token)
            if token_stop and i == len(out.new_token_ids) - 1:
                continue
            may_stop = len(completion.token_ids) > params.min_tokens
            stop_string = seq.detokenizer.add(token, may_stop) or stop_string
        if out.new_logprobs is not None:
            dicts = self._logprob_dicts(out.new_logprobs)
            completion.logprobs.extend(dicts)
            completion.cumulative_logprob += float(out.new_logprobs.logprobs[:, 0].sum())
        completion.text = seq.detokenizer.text
        return stop_string

    @staticmethod
    def _finish(seq: _Sequence, out: EngineCoreOutput, stop_string: str | None) -> None:
        if stop_string is not None:
            seq.output.finish_reason, seq.output.stop_reason = "stop", stop_string
        else:
            seq.output.finish_reason, seq.output.stop_reason = out.finish_reason, out.stop_reason
        seq.output.text = seq.detokenizer.text

    def finish_aborted(self, request_id: str) -> RequestOutput | None:
        """The request's output with its unfinished completions ended as "abort" (the
        caller then aborts it); None if it is not tracked here."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.sequences.values():
            if seq.output.finish_reason is None:
                seq.output.finish_reason = "abort"
        state.output.finished = True
        return state.output

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its core ids still running (to abort in the core)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        live = [core_id for core_id in state.sequences if core_id in self.parent_of]
        for core_id in live:
            del self.parent_of[core_id]
        return live

    def _logprob_dicts(self, lp: TokenLogprobs) -> list[dict[int, Logprob]]:
        ids, values, ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
        dicts = []
        for row_ids, row_values, rank in zip(ids, values, ranks):
            entry = {row_ids[0]: Logprob(row_values[0], rank, self._piece(row_ids[0]))}
            for r, (token, value) in enumerate(zip(row_ids[1:], row_values[1:]), start=1):
                entry.setdefault(token, Logprob(value, r, self._piece(token)))
            dicts.append(entry)
        return dicts

    def _piece(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def text_to_send(self, request_id: str, index: int) -> str | None:
        """What a stream may send of completion `index` now: the detokenizer holds back a
        possible start of a stop string. None once the request is done here (send all)."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        seq = next(s for s in state.sequences.values() if s.index == index)
        return seq.detokenizer.text_to_send(seq.output.finish_reason is not None)
