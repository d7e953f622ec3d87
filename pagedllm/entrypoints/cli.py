"""`pagedllm serve | chat | generate | bench`: one parser, every option with its default in --help.

    pagedllm serve                                   # bundled model at http://127.0.0.1:8000
    pagedllm serve ./my-model --port 8001 --api-key secret --served-model-name mine
    pagedllm chat                                    # in-process; --url http://host:port for a server
    pagedllm generate "The capital of France is" --max-tokens 20
    pagedllm bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 8
    pagedllm bench throughput | latency | all        # the offline engine against a peer (--peer hf|vllm)
    pagedllm bench profile                           # GPU busy time against wall time, per engine step
    pagedllm models                                  # the catalogue of real models; pagedllm pull NAME fetches one
"""

from __future__ import annotations

import argparse
import sys

from pagedllm import envs
from pagedllm.entrypoints.cli_args import API_KEY_ENV, add_engine_args, add_sampling_args, add_server_args
from pagedllm.entrypoints.user_errors import user_message


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,chat,generate,bench,pull,models}")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server", description="Start the OpenAI-compatible server.")
    add_engine_args(serve, model_positional=True)
    add_server_args(serve)
    serve.set_defaults(handler=_serve)

    chat = commands.add_parser("chat", help="chat in the terminal", description="Chat in the terminal, with a running server (--url) or an engine in this process.")
    chat.add_argument("--url", default=None, help="base URL of a running server, e.g. http://127.0.0.1:8000 (default: none, run the engine here)")
    chat.add_argument("--api-key", default=envs.PAGEDLLM_API_KEY, help=f"API key of the server (default: ${API_KEY_ENV})")
    chat.add_argument("--system", default=None, help="system prompt (default: none)")
    add_sampling_args(chat, max_tokens=512)
    add_engine_args(chat, model_positional=True)
    chat.set_defaults(handler=_chat)

    generate = commands.add_parser("generate", help="complete prompts and print the text", description="Complete prompts offline and print the text.")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text(s)")
    add_sampling_args(generate)
    add_engine_args(generate)
    generate.set_defaults(handler=_generate)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,latency,all,profile}")
    from pagedllm.benchmarks import serve as serve_bench

    bench_serve = kinds.add_parser("serve", help="load generator against a running server", description=serve_bench.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.add_arguments(bench_serve)
    bench_serve.set_defaults(handler=serve_bench.main)
    for workload in ("throughput", "latency", "all"):
        # Its options belong to pagedllm.benchmarks.offline: main() passes them on unparsed.
        offline = kinds.add_parser(workload, help=f"offline {workload} against a peer (see --help)", add_help=False)
        offline.set_defaults(handler=_offline_bench, workload=workload, forwards_options=True)
    profile = kinds.add_parser("profile", help="GPU busy vs wall time per engine step (see --help)", add_help=False)
    profile.set_defaults(handler=_profile_bench, forwards_options=True)
    from pagedllm.entrypoints import cli_models

    cli_models.add_commands(commands)
    return parser


def _serve(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.openai.api_server import run_server

    run_server(args)


def _chat(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.interactive import chat

    chat(args)


def _generate(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.interactive import generate

    generate(args)


def _offline_bench(args: argparse.Namespace) -> None:
    """`bench throughput|latency`: the options belong to pagedllm.benchmarks.offline; pass them on."""
    from pagedllm.benchmarks import offline

    parser = argparse.ArgumentParser(prog=f"pagedllm bench {args.workload}")
    offline.add_arguments(parser)
    offline.main(parser.parse_args([args.workload, *args.forwarded]))


def _profile_bench(args: argparse.Namespace) -> None:
    """`bench profile`: the options belong to pagedllm.benchmarks.step_profile; pass them on."""
    from pagedllm.benchmarks import step_profile

    parser = argparse.ArgumentParser(prog="pagedllm bench profile", description=step_profile.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    step_profile.add_arguments(parser)
    step_profile.main(parser.parse_args(args.forwarded))


def _version() -> str:
    from pagedllm import __version__

    return f"pagedllm {__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "forwards_options", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.forwarded = rest
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        message = user_message(e)
        if message is None or envs.PAGEDLLM_TRACEBACK:
            raise
        sys.exit(f"pagedllm {args.command}: error: {message}")


if __name__ == "__main__":
    main()
