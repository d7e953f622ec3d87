"""LLMEngine: the synchronous front end around an in-process EngineCore, used by
the offline LLM class. add_request -> step() until done."""

from __future__ import annotations

from pagedllm.config import EngineArgs
from pagedllm.core.interface import EngineCoreOutput
from pagedllm.engine.core import EngineCore
from pagedllm.engine.input_processor import InputProcessor, Prompt
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.core = EngineCore(args)
        self.tokenizer = self.core.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.core.info)
        self.outputs = OutputProcessor(self.tokenizer)
        self._pending: list[EngineCoreOutput] = []  # core outputs not yet processed

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> None:
        text, prompt_ids = self.inputs.tokenize(prompt)
        params = self.inputs.resolve_params(params, len(prompt_ids))
        requests = self.inputs.make_requests(request_id, prompt_ids, params)
        self.outputs.add_request(request_id, text, prompt_ids, params)
        for request in requests:
            self.core.add_request(request)

    def step(self) -> list[RequestOutput]:
        """One engine step. Outputs lag one step behind: the core outputs of step N are
        turned into RequestOutputs while the device computes step N + 1."""
        previous, self._pending = self._pending, []
        changed: list[RequestOutput] = []

        def process_previous() -> None:
            nonlocal changed
            changed, stopped = self.outputs.process(previous)
            if stopped:  # stop strings: the core aborts them (freeing their blocks)
                self.core.abort(stopped)

        self._pending = self.core.step(process_previous)
        return changed

    def abort_request(self, request_id: str) -> None:
        self.core.abort(self.outputs.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.core.has_unfinished_requests() or self.outputs.has_unfinished()
