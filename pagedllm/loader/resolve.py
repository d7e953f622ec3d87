"""Where a model reference points. One resolver for LLM(model=...), the CLI and the server.

A reference is tried as, in order:

    None                        the bundled SmolLM2-135M-Instruct GGUF
    a catalogue name            its pulled file (loader/catalogue.py; `pagedllm pull NAME` first)
    a .gguf file                that file
    a folder with config.json   that folder (save_pretrained, `hf download --local-dir`, a copied snapshot)
    a Hugging Face cache folder one holding models--org--name/ (what from_pretrained(..., cache_dir=DIR)
                                writes into DIR), a models--org--name/ folder itself, or an HF_HOME (hub/ inside)
    org/name                    its snapshot in download_dir, then in the Hugging Face cache
                                (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)
    org/name, allow_download    fetched with huggingface_hub into download_dir or the HF cache

Nothing touches the network unless allow_download is set. A cached repo looks like this:

    <cache>/models--facebook--opt-125m/
        refs/main                   "<commit>"   (a branch or tag -> the commit it names)
        snapshots/<commit>/         config.json, *.safetensors, tokenizer files (links into blobs/)
        blobs/<sha256>

Without revision= the snapshot refs/main names is used, or the only snapshot there is;
revision= takes a branch or tag with a file in refs/, or a commit hash (or a prefix of one).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger("pagedllm")

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """A model (or tokenizer) reference that leads nowhere; the message says where we looked."""


@dataclass(frozen=True)
class ModelFiles:
    path: str  # a folder holding config.json (format "hf"), or a .gguf file
    format: Literal["hf", "gguf"]
    name: str  # what to call the model: the repo id where one is known, else the reference given


def hf_hub_cache() -> tuple[str, str]:
    """(the Hugging Face cache folder, the variable that placed it), found as huggingface_hub
    finds it but read now: its constants are fixed at import, which would miss HF_HOME set later."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable]), variable
    for variable, home in (("HF_HOME", ""), ("XDG_CACHE_HOME", "huggingface")):
        if os.environ.get(variable):
            return os.path.join(os.path.expanduser(os.environ[variable]), home, "hub"), variable
    return os.path.expanduser(os.path.join("~", ".cache", "huggingface", "hub")), "the default"


def resolve_model(
    model: str | None,
    revision: str | None = None,
    download_dir: str | None = None,
    allow_download: bool = False,
) -> ModelFiles:
    if model is None:
        from pagedllm.loader.gguf import find_bundled_model

        return ModelFiles(find_bundled_model(), "gguf", BUNDLED_MODEL_NAME)
    from pagedllm.loader import catalogue

    entry = catalogue.find(model)
    if entry is not None and not os.path.exists(os.path.expanduser(model)):  # a file or folder of that name wins
        try:
            return ModelFiles(catalogue.pulled_path(entry), "gguf", entry.name)
        except catalogue.NotPulledError as e:
            raise ModelNotFoundError(str(e)) from None
    path = _find(model, revision, download_dir, allow_download, need="config.json")
    if path.endswith(".gguf") and os.path.isfile(path):
        return ModelFiles(path, "gguf", os.path.basename(path).removesuffix(".gguf"))
    return ModelFiles(path, "hf", _repo_id_of(path) or model)


def resolve_tokenizer(
    tokenizer: str, revision: str | None = None, download_dir: str | None = None, allow_download: bool = False
) -> str:
    """The folder of a tokenizer= reference: the same places as a model, needing tokenizer files
    rather than config.json and weights."""
    return _find(tokenizer, revision, download_dir, allow_download, need="tokenizer")


# --------------------------------------------------------------------------- the search


def _find(ref: str, revision: str | None, download_dir: str | None, allow_download: bool, need: str) -> str:
    looked: list[str] = []  # one line per place tried, for the error
    path = os.path.abspath(os.path.expanduser(ref))
    if os.path.isfile(path):
        if path.endswith(".gguf") and need == "config.json":
            return path
        raise ModelNotFoundError(
            f"{ref!r} is a file; pass a folder holding config.json, weights and tokenizer files"
            + (", or a .gguf file" if need == "config.json" else "")
        )
    if os.path.isdir(path):
        return _in_folder(ref, path, revision, need)
    looked.append(f"{path}: no such file or folder")
    if _REPO_ID.match(ref) and not ref.startswith("."):
        hub_cache, placed_by = hf_hub_cache()
        caches = ([(os.path.abspath(os.path.expanduser(download_dir)), "download_dir")] if download_dir else []) + [
            (hub_cache, f"the Hugging Face cache, from {placed_by}")
        ]
        for cache, label in caches:
            repo = os.path.join(cache, _repo_folder_name(ref))
            if os.path.isdir(repo):
                return _snapshot(ref, repo, revision, need)
            looked.append(f"{repo} ({label}): not there")
        if allow_download:
            return _download(ref, revision, download_dir, need)
    raise ModelNotFoundError(_not_found_message(ref, looked, need))


def _in_folder(ref: str, path: str, revision: str | None, need: str) -> str:
    """A folder the user named: a model folder, or a cache holding one."""
    if _has(path, need):
        if revision is not None and need == "config.json":
            logger.warning("revision=%r ignored: %s is a plain folder, not a cache with revisions", revision, path)
        return path
    if os.path.isdir(os.path.join(path, "snapshots")):  # models--org--name itself
        return _snapshot(ref, path, revision, need)
    for cache in (path, os.path.join(path, "hub")):  # a cache_dir, or an HF_HOME
        repos = _cached_repos(cache)
        if len(repos) == 1:
            return _snapshot(ref, os.path.join(cache, repos[0]), revision, need)
        if len(repos) > 1:
            names = ", ".join(_repo_id_from_folder(r) for r in repos)
            raise ModelNotFoundError(
                f"{path} is a Hugging Face cache holding several models ({names}); choose one with "
                f"model='org/name', download_dir={path!r} (CLI: --model org/name --download-dir {path})"
            )
    raise ModelNotFoundError(f"{path} holds no {_describe(need)}: {_listing(path)}. " + _hint(path, need))


def _snapshot(ref: str, repo: str, revision: str | None, need: str) -> str:
    """The snapshot folder of a cached repo that `revision` (or refs/main, or being the only one) picks."""
    snapshots_dir = os.path.join(repo, "snapshots")
    snapshots = sorted(os.listdir(snapshots_dir)) if os.path.isdir(snapshots_dir) else []
    refs = _refs(repo)
    wanted = revision or "main"
    commit = refs.get(wanted, wanted)
    chosen = [s for s in snapshots if s == commit or (len(commit) >= 7 and s.startswith(commit))]
    if not chosen and revision is None and len(snapshots) == 1:
        chosen = snapshots
    if len(chosen) != 1:
        have = ", ".join(f"{name} -> {c[:12]}" for name, c in sorted(refs.items())) or "none"
        raise ModelNotFoundError(
            f"{ref!r}: the cache at {repo} has no single snapshot for revision {wanted!r} "
            f"(refs: {have}; snapshots: {', '.join(s[:12] for s in snapshots) or 'none'}). "
            + ("Pass revision= a branch, tag or commit listed there, " if snapshots else "")
            + "or download that revision again on a machine with network and copy the cache over."
        )
    path = os.path.join(snapshots_dir, chosen[0])
    if not _has(path, need):
        raise ModelNotFoundError(
            f"{ref!r}: the cached snapshot {path} has no {_describe(need)} ({_listing(path)}); the download "
            f"was incomplete or fetched only some files. " + _hint(path, need)
        )
    return path


def _download(ref: str, revision: str | None, download_dir: str | None, need: str) -> str:
    """Fetch from the Hub, only because the user asked (allow_download): config, tokenizer
    files and one format of weights (safetensors where the repo has them), top level only."""
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(ref, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"] + (weights if need == "config.json" else [])
        logger.info("downloading %s%s from the Hugging Face Hub", ref, f"@{revision}" if revision else "")
        return huggingface_hub.snapshot_download(
            ref,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=patterns,
            ignore_patterns=["*/*", "consolidated*"],  # subfolders and the original (non-HF) Mistral weights
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"could not download {ref!r} from the Hugging Face Hub: {e}. "
            f"Without network, download it elsewhere and pass its folder (see `docs/models.md`)."
        ) from e


# --------------------------------------------------------------------------- helpers


def _has(folder: str, need: str) -> bool:
    if need == "tokenizer":
        return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)
    return os.path.isfile(os.path.join(folder, need))


def _describe(need: str) -> str:
    return "tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")" if need == "tokenizer" else "config.json"


def _hint(folder: str, need: str) -> str:
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if os.path.isdir(folder) else []
    if ggufs and need == "config.json":
        return f"To use a GGUF file, pass its path, e.g. {os.path.join(folder, ggufs[0])}."
    return "Pass a folder holding config.json, the weights (*.safetensors or pytorch_model*.bin) and tokenizer files."


def _listing(folder: str, limit: int = 8) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return "it is empty"
    return "it has " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refs(repo: str) -> dict[str, str]:
    """Branch and tag names (refs/main, refs/pr/1 ...) -> commit."""
    refs_dir, refs = os.path.join(repo, "refs"), {}
    for root, _, files in os.walk(refs_dir):
        for name in files:
            with open(os.path.join(root, name)) as f:
                refs[os.path.relpath(os.path.join(root, name), refs_dir)] = f.read().strip()
    return refs


def _repo_folder_name(repo_id: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo_id, repo_type="model")  # "models--org--name"


def _cached_repos(cache: str) -> list[str]:
    if not os.path.isdir(cache):
        return []
    return sorted(d for d in os.listdir(cache) if d.startswith("models--") and os.path.isdir(os.path.join(cache, d, "snapshots")))


def _repo_id_from_folder(folder_name: str) -> str:
    return folder_name.removeprefix("models--").replace("--", "/")


def _repo_id_of(path: str) -> str | None:
    """org/name of a snapshot folder inside a cache, else None."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return _repo_id_from_folder(parts[-3])
    return None


def _not_found_message(ref: str, looked: list[str], need: str) -> str:
    what = "tokenizer" if need == "tokenizer" else "model"
    repo_id = ref if _REPO_ID.match(ref) and "/" in ref else "org/name"
    folder = repo_id.rsplit("/", 1)[-1]
    return (
        f"{what} {ref!r} not found. Looked in:\n"
        + "".join(f"  - {line}\n" for line in looked)
        + "pagedllm downloads nothing unless asked. To get the model onto a machine without network:\n"
        f"  1. on a machine with network: hf download {repo_id} --local-dir {folder}\n"
        f"     (or from_pretrained('{repo_id}', cache_dir='{folder}'): that cache_dir folder works as is)\n"
        f"  2. copy the folder to this machine\n"
        f"  3. pass its path: LLM(model='/path/to/{folder}'), or --model /path/to/{folder}\n"
        f"To download here instead (network needed), pass allow_download=True (CLI: --allow-download)."
    )
