"""From EngineArgs to a model on its device, its tokenizer and a ModelConfig."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pagedllm import envs
from pagedllm.config import DTYPES, EngineArgs, ModelConfig
from pagedllm.distributed import SINGLE_RANK, TensorParallelGroup, building_for
from pagedllm.layers.cpu_packed import pack_model
from pagedllm.loader.checkpoint import Checkpoint, GGUFCheckpoint, open_checkpoint
from pagedllm.models import get_model_class
from pagedllm.worker.kv_cache import resolve_kv_cache_dtype

logger = logging.getLogger("pagedllm")


@dataclass
class ModelInfo:
    """A model without its weights: what the engine core needs when the weights live in
    tensor-parallel workers."""

    config: ModelConfig
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: set[int]


@dataclass
class LoadedModel:
    config: ModelConfig
    model: nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: set[int]

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.config, self.tokenizer, self.eos_token_ids)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, hf_config, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype) if config_dtype in DTYPES else None
        return config_dtype if config_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    # bf16 only where the CPU computes it natively: oneDNN's bf16 products (AMX, avx512_bf16) and
    # the C kernels' bf16 path (layers/cpu_ops.py). Measured on a Xeon with AMX, 2 threads, the
    # 64-request throughput workload, both in one run: bf16 425-431 tok/s, fp32 191-254 (8 threads:
    # 591 vs 488; docs/benchmarks.md). Elsewhere bf16 is emulated and ~4x slower in batches.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@contextlib.contextmanager
def _no_init(device: str, dtype: torch.dtype):
    """Build modules directly on the device in the target dtype, skipping the random
    init that the checkpoint overwrites anyway."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    old_dtype = torch.get_default_dtype()
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)
        for cls, fn in saved.items():
            cls.reset_parameters = fn


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Loading allocates a few hundred thousand objects (transformers' modules, a vocabulary of 49k tokens
    and merges, the layers) and leaves next to no garbage cycles: the collector's full passes over the
    growing heap cost ~0.15 s each, two per load of the bundled model, each freeing under 50 objects.
    Paused while loading; reference counting frees the rest as always, and the cycles wait for the next
    collection after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _with_progress(weights: Iterator[tuple[str, torch.Tensor]], total: int, desc: str):
    disable = envs.PAGEDLLM_NO_PROGRESS or None
    yield from tqdm(weights, total=total, desc=desc, unit="tensor", leave=False, disable=disable)


def _open(args: EngineArgs, rank: int, world_size: int) -> tuple[Checkpoint, ModelConfig]:
    checkpoint: Checkpoint = open_checkpoint(args)
    device = args.resolved_device
    max_len = checkpoint.max_position_embeddings
    if args.max_model_len is not None:
        max_len = args.max_model_len
    dtype = resolve_dtype(args.dtype, checkpoint.hf_config, device)
    config = ModelConfig(
        name=checkpoint.name,
        source=checkpoint.source,
        hf_config=checkpoint.hf_config,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        tensor_parallel_size=world_size,
        tensor_parallel_rank=rank,
        kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, dtype, device, args.quantization),
    )
    return checkpoint, config


def _tokenizer(args: EngineArgs, checkpoint: Checkpoint):
    tokenizer = None if args.skip_tokenizer_init else checkpoint.tokenizer()
    if args.chat_template is not None and tokenizer is not None:
        tokenizer.chat_template = _read_chat_template(args.chat_template)
    return tokenizer


@_cyclic_gc_paused()
def describe_model(args: EngineArgs) -> ModelInfo:
    """Config and tokenizer, no weights (the driver of tensor-parallel workers). Raises the
    same errors as load_model for a model that cannot be found or split."""
    checkpoint, config = _open(args, 0, args.tensor_parallel_size)
    get_model_class(checkpoint.hf_config)  # an unsupported architecture fails here, before workers start
    tokenizer = _tokenizer(args, checkpoint)
    return ModelInfo(config, tokenizer, checkpoint.eos_token_ids(tokenizer))


@_cyclic_gc_paused()
def load_model(args: EngineArgs, tp: TensorParallelGroup = SINGLE_RANK) -> LoadedModel:
    """The model on its device; with a tensor-parallel group, this rank's shard of it."""
    start = time.perf_counter()
    checkpoint, config = _open(args, tp.rank, tp.world_size)
    device, dtype = config.device, config.dtype
    model_class = get_model_class(checkpoint.hf_config)
    with _no_init(device, dtype), building_for(tp):
        model = model_class(checkpoint.hf_config)
    num_params = sum(p.numel() for p in model.parameters())  # before quantizing and packing turn weights into buffers
    from_gguf_blocks = args.quantization == "gguf" and isinstance(checkpoint, GGUFCheckpoint)
    taken: set[str] = set()  # tensors the swapped layers took from the file: not read again
    if from_gguf_blocks:
        from pagedllm.loader.quantize import quantize_before_loading

        taken = quantize_before_loading(model, checkpoint.header)
    if isinstance(checkpoint, GGUFCheckpoint) and args.quantization in (None, "gguf") and args.load_format != "dummy":
        from pagedllm.loader.gguf_packed import pack_before_loading

        taken |= pack_before_loading(model, checkpoint.header, dtype)  # CPU: the dense matrices, packed from the file
    if args.load_format == "dummy":
        _init_dummy_weights(model, args.seed)
    else:
        weights = checkpoint.weights(dtype, taken) if taken else checkpoint.weights(dtype)
        if tp.rank == 0:  # one progress bar, whatever the number of ranks
            weights = _with_progress(weights, checkpoint.num_tensors, "loading weights")
        model.load_weights((name, tensor.to(dtype)) for name, tensor in weights)
    model.eval().requires_grad_(False)
    if args.quantization is not None and not from_gguf_blocks:
        from pagedllm.loader.quantize import quantize_model

        quantize_model(model, args.quantization, checkpoint.path if isinstance(checkpoint, GGUFCheckpoint) else None)
    pack_model(model)  # CPU: the dense matrices that are left, in oneDNN's layout
    tokenizer = _tokenizer(args, checkpoint)
    logger.info(
        "loaded %s (%s) from %s: %s, %s, %.1fM parameters%s, in %.2f s",
        checkpoint.name,
        model_class.__name__,
        checkpoint.source,
        str(dtype).removeprefix("torch."),
        device,
        num_params / 1e6,
        f" (rank {tp.rank} of {tp.world_size})" if tp.world_size > 1 else "",
        time.perf_counter() - start,
    )
    if isinstance(checkpoint, GGUFCheckpoint) and args.quantization is None and device == "cpu":
        _suggest_gguf_blocks(checkpoint)
    return LoadedModel(config, model, tokenizer, checkpoint.eos_token_ids(tokenizer))


def _suggest_gguf_blocks(checkpoint: GGUFCheckpoint) -> None:
    """A GGUF's 4-bit matrices were just dequantized on a CPU where pagedllm's kernels could
    compute on them as stored: say so once, with the option that does it."""
    from pagedllm.layers import cpu_kernels
    from pagedllm.loader.quantize import stored_matrices

    if cpu_kernels.lib() is None or not any(m.is_q4 for m in stored_matrices(checkpoint.header).values()):
        return
    logger.info(
        "%s stores 4-bit weights, dequantized here; quantization='gguf' (--quantization gguf) computes on "
        "the file's own blocks with pagedllm's CPU kernels, as llama.cpp does: weights at ~5 bits each "
        "instead of 32, and faster decoding (docs/benchmarks.md)",
        checkpoint.name,
    )


@torch.no_grad()
def _init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights for speed measurements: matrices N(0, 0.02), biases 0, norm scales 1
    (throughput does not depend on the values; a sane scale keeps the numerics finite)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() > 1:
                param.normal_(0.0, 0.02, generator=generator)
            else:  # a norm's scale is 1, everything else (biases, a norm's shift) 0
                param.fill_(1.0 if name == "weight" else 0.0)


def _read_chat_template(value: str) -> str:
    """A chat template given inline or as the path of a file holding it."""
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")
