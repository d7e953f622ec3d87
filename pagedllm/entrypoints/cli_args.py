"""Command-line options, built from one table each so nothing is written twice:

- engine options: every field of EngineArgs, as `--field-name` (vLLM's names), type and
  default taken from the dataclass, help text from ENGINE_HELP;
- server options (host, port, API key, ...);
- sampling options for `generate` and `chat`, defaults from SamplingParams.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from pagedllm import envs
from pagedllm.config import DTYPES, EngineArgs, parse_memory_size
from pagedllm.sampling_params import SamplingParams

API_KEY_ENV = "PAGEDLLM_API_KEY"

# How long an idle keep-alive connection stays open. It must outlast the idle expiry of the
# clients and proxies in front (httpx and the openai SDK: 5 s; aiohttp: 15 s; load balancers:
# 60 s), whose clocks start later than ours (once they have read the response). With
# uvicorn's 5 s, equal to httpx's, a loaded client sent requests on connections just as we
# closed them, and those requests failed with a connection reset (httpx ReadError).
TIMEOUT_KEEP_ALIVE_S = 75.0  # nginx's keepalive_timeout

ENGINE_HELP: dict[str, str] = {
    "model": "model to serve: a folder with config.json and weights, or a .gguf file (default: the bundled SmolLM2-135M-Instruct)",
    "tokenizer": "tokenizer folder, if not the model's",
    "revision": "model revision (for models in the Hugging Face cache)",
    "download_dir": "where downloaded models go",
    "allow_download": "allow downloading a model named org/name from the Hugging Face Hub",
    "served_model_name": "the model name clients send and /v1/models lists (default: the model's name)",
    "dtype": "weights and activations dtype; auto = bfloat16 on GPU, and on CPUs with native bf16, else float32",
    "device": "cpu, cuda or cuda:N; auto = cuda if available",
    "seed": "random seed of the engine (requests without their own seed)",
    "max_model_len": "longest prompt + output in tokens (default: the model's context, capped by the KV cache)",
    "block_size": "tokens per KV cache block (a power of two)",
    "kv_cache_memory": "KV cache size, e.g. 2GiB or 512MiB (CPU default: 1GiB; on GPU a cap below gpu_memory_utilization)",
    "gpu_memory_utilization": "GPU: fraction of GPU memory for weights, activations and KV cache",
    "max_num_seqs": "most sequences in one step (batch size)",
    "max_num_batched_tokens": "token budget per step (default: 8192 on GPU, 2048 on CPU)",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "attention_backend": "torch or triton (default: triton on CUDA, torch elsewhere)",
    "enforce_eager": "GPU: no CUDA graphs",
    "tensor_parallel_size": "split the model over this many GPUs (or CPU processes), one worker process each",
    "distributed_executor_backend": "how the ranks run: mp = worker processes on this machine, ray = Ray actors "
    "on this machine or a Ray cluster (pip install 'pagedllm[ray]'; see docs/distributed.md)",
    "chat_template": "chat template: a Jinja file or inline text (default: the tokenizer's)",
    "trust_remote_code": "allow the model's own code from its folder (transformers' trust_remote_code)",
    "load_format": "auto, or dummy: random weights from config.json alone (benchmarks)",
    "skip_tokenizer_init": "no tokenizer: token-id prompts only, outputs carry no text",
    "async_scheduling": "on: prepare step N+1 while the device computes step N (outputs are the same); auto = on",
    "quantization": "CPU: compute on quantized weights -- gguf (a GGUF file's own Q4_0/Q4_1 weights), "
    "int4 or int8 (quantized at load); default: dense weights",
    "kv_cache_dtype": "KV cache dtype; auto = the model's, except float16 with CPU quantized compute (as llama.cpp); "
    "float16 halves the bytes a CPU decode step reads (the CPU kernels read float32 or float16; GPUs: the model's only)",
}
ENGINE_CHOICES: dict[str, list[str]] = {
    "dtype": ["auto", *DTYPES],
    "attention_backend": ["torch", "triton"],
    "load_format": ["auto", "dummy"],
    "async_scheduling": ["auto", "on", "off"],
    "quantization": ["gguf", "int4", "int8"],
    "kv_cache_dtype": ["auto", *DTYPES],
    "distributed_executor_backend": ["mp", "ray"],
}

SAMPLING_HELP: dict[str, str] = {
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 = greedy",
    "top_p": "nucleus sampling: smallest set of tokens with this total probability",
    "top_k": "sample from the k most likely tokens; 0 = all",
    "min_p": "drop tokens less likely than min_p times the most likely one",
    "repetition_penalty": "> 1 discourages tokens already in prompt or output",
    "presence_penalty": "penalty for tokens already generated (OpenAI)",
    "frequency_penalty": "penalty growing with each repetition (OpenAI)",
    "n": "completions per prompt",
    "stop": "stop at this string (repeat the option for several)",
    "ignore_eos": "keep generating after the end-of-sequence token",
}


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """One option per EngineArgs field; the model is positional (optional) in `pagedllm` commands."""
    group = parser.add_argument_group("engine options")
    for f in fields(EngineArgs):
        default = f.default if f.default is not MISSING else None
        help_text = _with_default(ENGINE_HELP.get(f.name, f"EngineArgs.{f.name}"), default)
        if f.name == "model" and model_positional:
            group.add_argument("model", nargs="?", default=None, help=help_text)
            group.add_argument("--model", dest="model_option", default=None, help="same as the positional model (default: none)")
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=help_text)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _value_type(str(f.type))
            kwargs["metavar"] = f.name.upper()
            if f.name in ENGINE_CHOICES:
                kwargs["choices"] = ENGINE_CHOICES[f.name]
                kwargs.pop("metavar")
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    values = {f.name: getattr(args, f.name) for f in fields(EngineArgs) if hasattr(args, f.name)}
    if getattr(args, "model_option", None):
        values["model"] = args.model_option
    try:
        return EngineArgs(**values)
    except ValueError as e:  # an option out of range: say which, without a traceback
        raise SystemExit(f"error: {e}") from e


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server options")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for all (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument(
        "--api-key",
        default=envs.PAGEDLLM_API_KEY,
        help=f"require 'Authorization: Bearer KEY' on the API routes; /health, /version, /metrics and the chat page stay open "
        f"(default: ${API_KEY_ENV}, else none)",
    )
    group.add_argument(
        "--web-ui", action=argparse.BooleanOptionalAction, default=True, help="serve the chat page at / (default: on)"
    )
    group.add_argument(
        "--max-request-body-bytes",
        type=_byte_size,
        default=None,
        metavar="SIZE",
        help="refuse larger request bodies with 413, e.g. 16MiB (default: 4MiB + 64 bytes per token of max_model_len)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may go on before they are aborted (default: 5)",
    )
    group.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=TIMEOUT_KEEP_ALIVE_S,
        metavar="SECONDS",
        help="close a keep-alive connection idle this long; keep it above the idle expiry of the clients and proxies "
        f"in front, or their requests may meet a connection as it closes (default: {TIMEOUT_KEEP_ALIVE_S:g})",
    )
    group.add_argument(
        "--data-parallel-size", type=int, default=1, metavar="N",
        help="run N engine cores (replicas of the model, each on its own GPUs, or its share of the CPU cores) behind "
        "this server; requests go to the least busy (default: 1)",
    )
    group.add_argument(
        "--api-server-count", type=int, default=None, metavar="K",
        help="run K HTTP server processes on the port, each reaching every engine core, for when one process's CPU "
        "limits streaming (default: the data-parallel size)",
    )
    group.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False, help="log every HTTP request (default: off)")
    group.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level (default: info)"
    )
    add_chat_reply_args(group)


def add_chat_reply_args(group) -> None:
    """Tool calling and reasoning options of the server (vLLM's flags)."""
    from pagedllm.entrypoints.openai.reasoning import REASONING_PARSERS
    from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS

    group.add_argument(
        "--enable-auto-tool-choice", action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser (default: off)',
    )
    group.add_argument(
        "--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
        help="how the model writes tool calls: hermes (Qwen2.5/Qwen3), llama3_json, mistral, pythonic (default: none)",
    )
    group.add_argument(
        "--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
        help="move <think>...</think> out of the content into reasoning_content (default: none)",
    )


def chat_options_from(args: argparse.Namespace):
    from pagedllm.entrypoints.openai.serving_chat import ChatOptions
    from pagedllm.entrypoints.openai.tools import ToolOptions

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral or pythonic)")
    return ChatOptions(ToolOptions(args.tool_call_parser, args.enable_auto_tool_choice), args.reasoning_parser)


def add_sampling_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    group = parser.add_argument_group("sampling options")
    for f in fields(SamplingParams):
        if f.name not in SAMPLING_HELP:
            continue
        default = defaults.get(f.name, f.default)
        help_text = _with_default(SAMPLING_HELP[f.name], default)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "stop":
            group.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        elif isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_value_type(str(f.type)), default=default, help=help_text)


def sampling_params_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{name: getattr(args, name) for name in SAMPLING_HELP})


def _byte_size(value: str) -> int:
    try:
        size = parse_memory_size(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"cannot read {value!r} as a size: write e.g. 16MiB or a number of bytes")
    return size


def _value_type(annotation: str):
    kinds = {part.strip() for part in annotation.split("|")} - {"None"}
    if kinds == {"int"}:
        return int
    if kinds == {"float"}:
        return float
    return str  # str, and sizes like kv_cache_memory (int | float | str) that EngineArgs parses


def _with_default(help_text: str, default: Any) -> str:
    """Help ending in the default, unless the text already says what the default means."""
    if "(default:" in help_text:
        return help_text
    return f"{help_text} (default: {'none' if default is None else default})"
