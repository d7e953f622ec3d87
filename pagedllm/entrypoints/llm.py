"""The offline API: LLM(...).generate(prompts, SamplingParams(...)) and LLM.chat."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagedllm import envs
from pagedllm.config import EngineArgs
from pagedllm.engine.input_processor import Prompt
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.logger import init_logging
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

Message = dict[str, Any]
# vLLM's prompt dicts (TextPrompt, TokensPrompt) are taken too: {"prompt": text} or {"prompt_token_ids": ids}.
PromptInput = Prompt | dict[str, Any]


class LLM:
    """An engine for offline batched generation. `LLM()` loads the bundled
    SmolLM2-135M-Instruct; `LLM(model=path, dtype=..., kv_cache_memory="2GiB", ...)`
    takes the same options as `pagedllm serve`."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        init_logging()
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (texts, token-id lists, or vLLM's {"prompt": ...} /
        {"prompt_token_ids": ...} dicts) together; outputs in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_unwrap(p) for p in prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        request_ids = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, prompt, p)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the model's chat template.
        `tools` (OpenAI's function-tool dicts) reach the template, as in the server; to make a
        call that always parses, constrain the output with SamplingParams(structured_outputs=...)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = dict(chat_template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        prompts = [
            self.engine.tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        show = use_tqdm and not envs.PAGEDLLM_NO_PROGRESS
        bar = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not show, dynamic_ncols=True)
        start, num_generated = time.perf_counter(), 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_generated += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"{num_generated / (time.perf_counter() - start):.1f} tok/s out")
        except BaseException:
            for request_id in request_ids:  # leave the engine clean for the next call
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]


def _unwrap(prompt: PromptInput) -> Prompt:
    """A prompt dict's text or token ids; anything else as given."""
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt)
    if keys == {"prompt"} or keys == {"prompt_token_ids"}:
        return prompt[keys.pop()]
    raise ValueError(
        f"a prompt dict takes one key, 'prompt' (text) or 'prompt_token_ids' (token ids); got {sorted(keys)}"
    )
