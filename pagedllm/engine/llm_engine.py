"""LLMEngine: the synchronous front end around an in-process EngineCore, used by
the offline LLM class. add_request -> step() until done."""

from __future__ import annotations

from pagedllm.config import EngineArgs
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

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> None:
        if params.structured_outputs is not None:  # a bad schema fails here, before anything runs
            from pagedllm.structured_output.grammar import validate

            validate(params.structured_outputs)
        text, prompt_ids = self.inputs.tokenize(prompt)
        params = self.inputs.resolve_params(params, len(prompt_ids))
        requests = self.inputs.make_requests(request_id, prompt_ids, params)
        self.outputs.add_request(request_id, text, prompt_ids, params)
        for request in requests:
            self.core.add_request(request)

    def step(self) -> list[RequestOutput]:
        """One engine step: the core launches the next step and returns the outputs of the
        one before, which are turned into RequestOutputs while the device computes."""
        core_outputs = self.core.step()
        failed = self.core.take_failed()
        if failed:
            request_id, message = failed[0]
            raise ValueError(f"request {request_id}: {message}")
        changed, stopped = self.outputs.process(core_outputs)
        if stopped:  # stop strings: the core aborts them (freeing their blocks)
            self.core.abort(stopped)
        return changed

    def abort_request(self, request_id: str) -> None:
        self.core.abort(self.outputs.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.outputs.has_unfinished()
