"""`pagedllm pull` / `pagedllm models` and catalogue names in the resolver.

The pull runs for real (pip installs part packages into this environment, the file is assembled
and checked, the parts are uninstalled) on a made-up two-part model whose wheels are built here
and served to pip from a folder (PIP_NO_INDEX + PIP_FIND_LINKS), so the test needs no network.
The real catalogue entries are pulled by scripts/setup.sh and used by tests/test_gemma3.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile

import pytest

from pagedllm.entrypoints.cli import main as cli_main
from pagedllm.loader import catalogue
from pagedllm.loader.catalogue import CatalogueModel, PartPackage
from pagedllm.loader.resolve import ModelNotFoundError, resolve_model

SLICES = [os.urandom(3000), os.urandom(1234)]


def _wheel(folder, distribution: str, module: str, file: str, data: bytes) -> None:
    """A minimal pure-Python wheel holding module/__init__.py and module/<file>."""
    dist_info = f"{module}-1.0.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/{file}": data,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as whl:
        for name, content in files.items():
            whl.writestr(name, content)
        whl.writestr(f"{dist_info}/RECORD", record)


@pytest.fixture
def fake_model(tmp_path, monkeypatch) -> CatalogueModel:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, data in enumerate(SLICES, start=1):
        distribution, module = f"pagedllm-test-part{i}", f"pagedllm_test_part{i}"
        _wheel(wheels, distribution, module, f"data/part{i:02d}.bin", data)
        parts.append(PartPackage(f"{distribution}==1.0", module, f"data/part{i:02d}.bin"))
    model = CatalogueModel("test-model", "a made-up model", "test-model.gguf", hashlib.sha256(b"".join(SLICES)).hexdigest(),
                           sum(map(len, SLICES)), tuple(parts))  # fmt: skip
    monkeypatch.setitem(catalogue.CATALOGUE, model.name, model)
    monkeypatch.setenv("PAGEDLLM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return model


def test_pull_assembles_checks_and_uninstalls_the_parts(fake_model, tmp_path, capsys):
    with pytest.raises(ModelNotFoundError, match="not pulled yet.*Run `pagedllm pull test-model`"):
        resolve_model("test-model")
    cli_main(["pull", "test-model"])
    path = tmp_path / "cache" / "test-model.gguf"
    assert path.read_bytes() == b"".join(SLICES)
    assert os.listdir(tmp_path / "cache") == ["test-model.gguf"]  # no .partial left
    importlib.invalidate_caches()
    assert all(importlib.util.find_spec(part.module) is None for part in fake_model.parts)
    files = resolve_model("Test-Model")
    assert (files.path, files.format, files.name) == (str(path), "gguf", "test-model")
    cli_main(["models"])
    assert f"pulled: {path}" in capsys.readouterr().out
    catalogue.pull(fake_model)  # a second pull finds it there: nothing is installed
    assert path.read_bytes() == b"".join(SLICES)


def test_a_wrong_checksum_keeps_nothing(fake_model, tmp_path, monkeypatch):
    monkeypatch.setitem(catalogue.CATALOGUE, "test-model", CatalogueModel(**{**fake_model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="sha256 is .* expected 0000"):
        cli_main(["pull", "test-model"])
    assert os.listdir(tmp_path / "cache") == []
    importlib.invalidate_caches()
    assert all(importlib.util.find_spec(part.module) is None for part in fake_model.parts)


def test_catalogue_names_not_pulled_fail_at_once_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_MODEL_CACHE", str(tmp_path))
    for name in ("qwen2.5-coder-1.5b-instruct", "gemma-3-270m"):
        with pytest.raises(ModelNotFoundError, match=f"Run `pagedllm pull {name}`"):
            resolve_model(name)
    with pytest.raises(SystemExit, match="not in the catalogue; known: smollm2-135m-instruct"):
        cli_main(["pull", "llama-9000"])


def test_the_bundled_model_is_in_the_catalogue(bundled_gguf):
    assert resolve_model("smollm2-135m-instruct").path == bundled_gguf
