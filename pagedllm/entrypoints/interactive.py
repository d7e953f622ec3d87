"""`pagedllm generate` (offline completions, printed) and `pagedllm chat` (a terminal chat
with a running server, or with an engine in this process), both streaming to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator

from pagedllm.entrypoints.cli_args import engine_args_from, sampling_params_from

Message = dict[str, str]


def generate(args: argparse.Namespace) -> None:
    from pagedllm import LLM

    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    llm = LLM(**dataclasses.asdict(engine_args_from(args)))
    params = sampling_params_from(args)
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    several = len(outputs) > 1 or params.n > 1
    for i, output in enumerate(outputs):
        for completion in output.outputs:
            if several:
                print(f"--- prompt {i}, completion {completion.index} ({completion.finish_reason})")
            print(f"{output.prompt}{completion.text}")


def chat(args: argparse.Namespace) -> None:
    reply = _server_replies(args) if args.url else _local_replies(args)
    messages: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        answer = ""
        for delta in reply(messages):
            answer += delta
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": answer})


def _server_replies(args: argparse.Namespace) -> Callable[[list[Message]], Iterator[str]]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(10.0, read=None))
    model = client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    sampling = {name: value for name, value in vars(sampling_params_from(args)).items() if name in _OPENAI_FIELDS}

    def reply(messages: list[Message]) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True, **sampling}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise SystemExit(f"server error {response.status_code}: {response.text}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise SystemExit(f"server error: {chunk['error']['message']}")
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]

    return reply


_OPENAI_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "stop", "ignore_eos",
}


def _local_replies(args: argparse.Namespace) -> Callable[[list[Message]], Iterator[str]]:
    from pagedllm import LLM

    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    engine = LLM(**dataclasses.asdict(engine_args_from(args))).engine
    params = sampling_params_from(args)
    ids = itertools.count()

    def reply(messages: list[Message]) -> Iterator[str]:
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        request_id = str(next(ids))
        engine.add_request(request_id, engine.tokenizer.encode(prompt, add_special_tokens=False), dataclasses.replace(params, n=1))
        sent = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    text = engine.outputs.text_to_send(request_id, 0)
                    text = output.outputs[0].text if text is None else text
                    yield text[sent:]
                    sent = len(text)
        finally:
            engine.abort_request(request_id)

    return reply
