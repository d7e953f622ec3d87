"""Engine options. Frozen and validated at construction; derived values are properties.

`EngineArgs` is what a user sets (the LLM constructor, the CLI). What depends on
the model (its hf config, dtype, context length) is resolved at load into a
`ModelConfig`; what depends on memory (the number of KV blocks) is decided by the
model runner after the model is in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

# No torch here: the scheduler and the server process import this module.
DTYPES = ("float32", "bfloat16", "float16")  # torch.<name>
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory_size(value: int | float | str) -> int:
    """Bytes from 1073741824, "1GiB", "512 MiB", "2G" (G/M/K mean GiB/MiB/KiB, as in llama.cpp)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    unit = m.group(2).lower() if m else ""
    unit = {"k": "kib", "m": "mib", "g": "gib"}.get(unit, unit)
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"kv_cache_memory: cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shard_range(num_units: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's units when num_units split as evenly as they can: the first
    num_units % world_size ranks hold one more. 9 heads over 2 ranks: [0, 5) and [5, 9)."""
    base, extra = divmod(num_units, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct
    tokenizer: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    allow_download: bool = False
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | str | None = None  # bytes of KV cache (CPU default 1 GiB; GPU: a cap)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str | None = None  # None = triton on CUDA, torch elsewhere
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # how ranks run: "mp" worker processes, "ray" Ray actors
    chat_template: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    skip_tokenizer_init: bool = False  # token-id prompts only; outputs carry no text
    async_scheduling: str = "auto"  # on: schedule step N+1 while the device runs step N; auto = on
    quantization: str | None = None  # CPU: gguf (a GGUF's own 4-bit weights), int4, int8; None = dense
    kv_cache_dtype: str = "auto"  # auto: the model's dtype (float16 with CPU quantized compute); or a dtype

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        kv_dtype = _DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if kv_dtype != "auto" and kv_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto, {', '.join(DTYPES)}; got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", kv_dtype)
        if self.quantization not in (None, "gguf", "int4", "int8"):
            raise ValueError(f"quantization must be gguf, int4 or int8 (or unset for dense weights); got {self.quantization!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be mp or ray, got {self.distributed_executor_backend!r}")

    @property
    def resolved_device(self) -> str:
        return default_device() if self.device == "auto" else self.device

    @property
    def resolved_async_scheduling(self) -> bool:
        return self.async_scheduling != "off"

    @property
    def kv_cache_memory_bytes(self) -> int:
        return parse_memory_size(self.kv_cache_memory if self.kv_cache_memory is not None else "1GiB")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """The model as loaded: where it came from and the numbers the engine needs."""

    name: str  # what the user named (or the bundled model's name)
    source: str  # where its files were found, for the start-up log
    hf_config: Any  # transformers PretrainedConfig
    dtype: Any  # torch.dtype
    device: str
    max_model_len: int
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0  # which rank's share of the heads this process holds
    kv_cache_dtype: Any = None  # torch.dtype of the KV cache; None = dtype

    def __post_init__(self) -> None:
        n, kv_heads = self.tensor_parallel_size, self.num_kv_heads
        if n > kv_heads:
            raise ValueError(
                f"tensor_parallel_size {n} is more than the {kv_heads} KV heads of {self.name}: each rank holds "
                f"whole KV heads (with the query heads that share them), so use a tensor_parallel_size of at most "
                f"{kv_heads}; sizes that divide {kv_heads} give every rank an equal share"
            )
        if not 0 <= self.tensor_parallel_rank < n:
            raise ValueError(f"tensor_parallel_rank {self.tensor_parallel_rank} is not in [0, {n})")

    @property
    def cache_dtype(self) -> Any:
        return self.kv_cache_dtype or self.dtype

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.hf_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def num_local_kv_heads(self) -> int:
        """The KV heads this rank holds (and caches): an even share, the first ranks one more
        where the heads do not divide."""
        start, end = shard_range(self.num_kv_heads, self.tensor_parallel_rank, self.tensor_parallel_size)
        return end - start

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool

    @property
    def num_tokens(self) -> int:
        return self.block_size * self.num_blocks
