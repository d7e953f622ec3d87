"""A checkpoint on disk, whatever its format: config, tokenizer and a stream of
HF-named weight tensors, read one at a time so two copies never coexist."""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from pagedllm.config import EngineArgs
from pagedllm.loader.lazy_tensor import CheckpointTensor
from pagedllm.loader.resolve import BUNDLED_MODEL_NAME, resolve_model, resolve_tokenizer  # noqa: F401 (re-exported)

logger = logging.getLogger("pagedllm")


class Checkpoint:
    name: str
    source: str
    hf_config: Any
    num_tensors: int | None = None

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def max_position_embeddings(self) -> int:
        c = self.hf_config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048

    def eos_token_ids(self, tokenizer) -> set[int]:
        ids = getattr(self.hf_config, "eos_token_id", None)
        ids = set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return ids


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A GGUF file: its header (metadata and tensor table) is read once and serves the config,
    the tokenizer, the weights and the quantized layers' blocks."""

    path: str
    name: str

    @cached_property
    def header(self):
        from pagedllm.loader.gguf import read_gguf_header

        return read_gguf_header(self.path)

    @property
    def source(self) -> str:
        return self.path

    @cached_property
    def hf_config(self):
        from pagedllm.loader.gguf import build_config

        return build_config(self.header)

    def weights(self, dtype: torch.dtype, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
        """skip: tensors not to read (those a quantized model computes on as stored). The matrices
        come unread: a tensor-parallel rank dequantizes only its rows of them."""
        from pagedllm.loader.gguf import iter_gguf_weights

        return iter_gguf_weights(self.header, dtype, skip, lazy=True)

    def tokenizer(self):
        return self._tokenizer

    @cached_property
    def _tokenizer(self):
        from pagedllm.loader.gguf_tokenizer import build_tokenizer

        return build_tokenizer(self.header.metadata)


@dataclass
class HFFolderCheckpoint(Checkpoint):
    """A folder as `save_pretrained` writes it: config.json, weights and tokenizer files.

    Weights, in order of preference: *.safetensors (one file, or shards named by
    model.safetensors.index.json), then pytorch_model*.bin (likewise with
    pytorch_model.bin.index.json). They are read one shard and one tensor at a time.
    """

    path: str
    name: str
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    device: str = "cpu"  # where safetensors tensors are read to (a GPU: through pinned buffers)

    @property
    def source(self) -> str:
        return self.path

    @cached_property
    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code, local_files_only=True)

    @cached_property
    def max_position_embeddings(self) -> int:
        """The config's context length, capped at the sliding window where the model uses one
        (Mistral 7B v0.1) and our implementation of it attends fully, which is exact only within the window."""
        max_len = super().max_position_embeddings
        if _honours_sliding_window(self.hf_config):
            return max_len
        window = getattr(self.hf_config, "sliding_window", None)
        layer_types = getattr(self.hf_config, "layer_types", None)
        if window and (layer_types is None or "sliding_attention" in layer_types) and window < max_len:
            logger.warning(
                "%s uses sliding-window attention (window %d), which pagedllm does not implement: "
                "max_model_len is capped at %d, where full attention gives the same results",
                self.name, window, window,
            )
            return window
        return max_len

    @cached_property
    def weight_files(self) -> list[str]:
        names = set(os.listdir(self.path))
        for suffix, index_name in ((".safetensors", _SAFETENSORS_INDEX), (".bin", _BIN_INDEX)):
            if index_name in names:  # only the shards the index names (a folder may hold stray files)
                with open(os.path.join(self.path, index_name)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                absent = [s for s in shards if s not in names]
                if absent:
                    raise FileNotFoundError(
                        f"{self.path}: {index_name} names weight shards that are not there: {', '.join(absent)}; "
                        f"copy the whole model folder again"
                    )
                return [os.path.join(self.path, s) for s in shards]
            plain = sorted(n for n in names if n.endswith(suffix) and (suffix != ".bin" or n.startswith("pytorch_model")))
            if plain:
                return [os.path.join(self.path, n) for n in plain]
        raise FileNotFoundError(
            f"no weights in {self.path}: expected *.safetensors or pytorch_model*.bin (it has {', '.join(sorted(names))}); "
            f"copy the weight files of the model into it"
        )

    @cached_property
    def num_tensors(self) -> int | None:
        """For the progress bar: from the safetensors headers (cheap) or the index; None for a lone .bin."""
        files = self.weight_files
        if files[0].endswith(".safetensors"):
            return sum(len(_safetensors_header(file)[0]) for file in files)
        index = os.path.join(self.path, _BIN_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                return len(json.load(f)["weight_map"])
        return None

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
        """(HF name, tensor) one at a time: a tensor is read when asked for and dropped once the
        model has copied it, so memory holds the model plus one tensor (plus, for .bin, the
        current shard where it cannot be memory-mapped). A .safetensors tensor comes unread, as a
        CheckpointTensor: a tensor-parallel rank reads only its rows of it, and a tensor the
        model skips (a tied LM head) is never read."""
        for file in self.weight_files:
            if file.endswith(".safetensors"):
                yield from open_safetensors(file, self.device)
            else:
                state = _load_bin(file)
                while state:
                    name = next(iter(state))
                    yield name, state.pop(name)
                del state

    def tokenizer(self):
        return load_hf_tokenizer(self.tokenizer_path or self.path, self.trust_remote_code)

    def eos_token_ids(self, tokenizer) -> set[int]:
        ids = super().eos_token_ids(tokenizer)
        gen_config = os.path.join(self.path, "generation_config.json")
        if os.path.exists(gen_config):
            with open(gen_config) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        return ids


@dataclass
class GGUFWithHFTokenizer(GGUFCheckpoint):
    """A GGUF file whose tokenizer comes from elsewhere (tokenizer=), as vLLM advises for GGUF."""

    tokenizer_path: str = ""
    trust_remote_code: bool = False

    def tokenizer(self):
        return load_hf_tokenizer(self.tokenizer_path, self.trust_remote_code)


_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _honours_sliding_window(hf_config) -> bool:
    from pagedllm.models import get_model_class

    try:
        return getattr(get_model_class(hf_config), "honours_sliding_window", False)
    except ValueError:  # an unsupported architecture: refused with its message when the model is built
        return False


def _safetensors_header(file: str) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data) of a .safetensors file:

        u64 little-endian N | N bytes of JSON header | data (offsets are relative to its start)
    """
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def open_safetensors(file: str, device: str = "cpu") -> Iterator[tuple[str, SafetensorsTensor]]:
    """The tensors of a .safetensors file in file order, unread: each CheckpointTensor reads
    from the file when asked, and only until the next one is taken. Reads are plain read()s into
    tensors of their own on `device` (a GPU: through pinned buffers). (safetensors' safe_open
    hands out views of a memory map instead: copying those faults the file in a page at a time,
    5x slower here for a 1B model, and the mapped pages add a second model's worth to the
    resident memory.)"""
    header, data_start = _safetensors_header(file)
    staging = _PinnedStaging() if device.startswith("cuda") else None
    where = torch.empty(0, device=device).device  # "cuda" -> "cuda:N": comparable with a parameter's
    with open(file, "rb", buffering=0) as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which pagedllm cannot load")
            current = [True]  # cleared when the next tensor is taken; shared by the handle's .to() copies
            yield name, SafetensorsTensor(name, f, file, data_start + info["data_offsets"][0], tuple(info["shape"]),
                                          _SAFETENSORS_DTYPES[info["dtype"]], where, staging, current)
            current[0] = False
    if staging is not None:
        staging.finish()


class SafetensorsTensor(CheckpointTensor):
    """A tensor of an open .safetensors file: a range of rows is a range of bytes, read() into its
    tensor (a GPU's: through pinned buffers)."""

    def __init__(self, name: str, file, path: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, staging: _PinnedStaging | None, current: list[bool]) -> None:
        super().__init__(name, shape, dtype, device, current)
        self.file, self.path, self.offset, self.staging = file, path, offset, staging

    def _read_rows(self, start: int, count: int, out: torch.Tensor | None) -> torch.Tensor:
        tensor = out if out is not None else torch.empty((count, *self.shape[1:]), dtype=self.stored_dtype, device=self.device)
        row_bytes = tensor[:1].numel() * tensor.element_size() if count else 0
        self.file.seek(self.offset + start * row_bytes)
        if self.staging is None:
            _read_exactly(self.file, tensor.view(-1).view(torch.uint8).numpy(), self.path)
        else:
            self.staging.read(self.file, tensor.view(-1).view(torch.uint8), self.path)
        return tensor


def _read_exactly(f, buffer, file: str) -> None:
    done = 0
    while done < len(buffer):  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(buffer[done:])
        if not n:
            raise ValueError(f"{file} is truncated: copy it again")
        done += n


class _PinnedStaging:
    """File -> pinned host buffer -> GPU in 64 MiB chunks, two buffers in turn: the read of one
    chunk overlaps the copy of the one before (copies run on the current stream, so whatever
    uses the tensor afterwards is ordered after them)."""

    CHUNK = 64 << 20

    def __init__(self) -> None:
        self.buffers = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer is free again
        self.turn = 0

    def read(self, f, dst: torch.Tensor, file: str) -> None:
        """Fill dst (1-D uint8 on the GPU) from f's current position."""
        for start in range(0, dst.numel(), self.CHUNK):
            n = min(self.CHUNK, dst.numel() - start)
            i, self.turn = self.turn, self.turn ^ 1
            if self.copied[i] is not None:
                self.copied[i].synchronize()
            _read_exactly(f, self.buffers[i][:n].numpy(), file)
            dst[start : start + n].copy_(self.buffers[i][:n], non_blocking=True)
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record()

    def finish(self) -> None:
        for event in self.copied:
            if event is not None:
                event.synchronize()


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    try:  # memory-mapped: tensors are paged in as they are copied
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-1.6 (non-zip) format cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def load_hf_tokenizer(folder: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from pagedllm.loader.resolve import TOKENIZER_FILES

    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the model "
            f"into it, or pass tokenizer= a folder or org/name that has them (CLI: --tokenizer)"
        )
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)


def open_checkpoint(args: EngineArgs) -> Checkpoint:
    """The checkpoint `args.model` refers to (see loader/resolve.py for what a reference can be)."""
    files = resolve_model(args.model, args.revision, args.download_dir, args.allow_download)
    tokenizer_path = (
        resolve_tokenizer(args.tokenizer, None, args.download_dir, args.allow_download) if args.tokenizer else None
    )
    if files.format == "gguf":
        if tokenizer_path is not None:
            return GGUFWithHFTokenizer(files.path, files.name, tokenizer_path, args.trust_remote_code)
        return GGUFCheckpoint(files.path, files.name)
    return HFFolderCheckpoint(files.path, files.name, tokenizer_path, args.trust_remote_code, args.resolved_device)
