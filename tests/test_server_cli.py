"""The `pagedllm` command line: one parser, every engine option (from EngineArgs) with its
default in --help, the vLLM names, and the subcommands' wiring. No model is loaded."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.cli import make_parser
from pagedllm.entrypoints.cli_args import engine_args_from


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", ["serve", "chat", "generate"])
def test_every_engine_option_is_documented_with_its_default(command):
    parser = _subparser(make_parser(), command)
    options = {a.dest: a for a in parser._actions}
    for f in fields(EngineArgs):
        assert f.name in options, f"--{f.name.replace('_', '-')} missing from `pagedllm {command}`"
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS) and action.dest != "help" and action.nargs != "+":
            assert "default" in action.help, f"{action.option_strings or action.dest}: help does not give the default"


def test_vllm_option_names_and_defaults():
    args = make_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.enable_prefix_caching) == ("127.0.0.1", 8000, None, True)
    args = make_parser().parse_args([
        "serve", "./my-model", "--port", "8001", "--api-key", "secret", "--served-model-name", "mine",
        "--max-model-len", "1024", "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
        "--dtype", "float32", "--kv-cache-memory", "2GiB", "--gpu-memory-utilization", "0.5",
        "--no-enable-prefix-caching", "--seed", "3", "--chat-template", "t.jinja",
    ])
    engine = engine_args_from(args)
    assert engine.model == "./my-model" and engine.served_model_name == "mine" and engine.max_model_len == 1024
    assert engine.kv_cache_memory_bytes == 2 * 2**30 and not engine.enable_prefix_caching and engine.block_size == 32
    assert (args.port, args.api_key) == (8001, "secret")


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_API_KEY", "from-env")
    assert make_parser().parse_args(["serve"]).api_key == "from-env"


def test_bad_engine_option_is_a_short_error():
    with pytest.raises(SystemExit, match="max_num_seqs must be at least 1"):
        engine_args_from(make_parser().parse_args(["serve", "--max-num-seqs", "0"]))


def test_bench_subcommands():
    args = make_parser().parse_args(["bench", "serve", "--num-prompts", "5", "--request-rate", "2", "--max-concurrency", "4"])
    assert (args.num_prompts, args.request_rate, args.max_concurrency, args.dataset) == (5, "2", 4, "random")
    parser = make_parser()
    args, rest = parser.parse_known_args(["bench", "throughput", "--num-prompts", "8"])
    assert args.workload == "throughput" and rest == ["--num-prompts", "8"]  # passed on to benchmarks.offline
