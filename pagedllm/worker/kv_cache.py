"""Sizing and allocating the paged KV cache tensors."""

from __future__ import annotations

import logging
import math
import mmap

import torch

from pagedllm.config import EngineArgs, ModelConfig

logger = logging.getLogger("pagedllm")

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def resolve_kv_cache_dtype(requested: str, dtype: torch.dtype, device: str, quantization: str | None) -> torch.dtype:
    """The KV cache's dtype: the model's, or float16 for auto with CPU quantized compute in float32
    (llama.cpp's default cache type: half the bytes a decode step reads, logprobs within ~1e-3),
    or what was asked -- on a GPU only the model's (its attention kernels read that)."""
    if requested == "auto":
        return torch.float16 if device == "cpu" and quantization is not None and dtype == torch.float32 else dtype
    kv_dtype = getattr(torch, requested)
    if device != "cpu" and kv_dtype != dtype:
        raise ValueError(
            f"kv_cache_dtype {requested} differs from the model's dtype {str(dtype).removeprefix('torch.')}: the GPU "
            "attention kernels read a cache of the model's dtype; leave kv_cache_dtype auto"
        )
    return kv_dtype


def bytes_per_block(config: ModelConfig, block_size: int) -> int:
    element = torch.empty(0, dtype=config.cache_dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_local_kv_heads * config.head_dim * element


def num_blocks_for(config: ModelConfig, args: EngineArgs, activation_bytes: int) -> int:
    """CPU: the kv_cache_memory budget. GPU: gpu_memory_utilization of the card, less
    what is in use (weights, CUDA context, other processes) and the activation peak
    of the largest step, capped by kv_cache_memory when it is given."""
    per_block = bytes_per_block(config, args.block_size)
    if config.device == "cpu":
        budget = args.kv_cache_memory_bytes
    else:
        free, total = torch.cuda.mem_get_info(torch.device(config.device))
        budget = int(total * args.gpu_memory_utilization) - (total - free) - activation_bytes
        if args.kv_cache_memory is not None:  # a cap below what the card allows
            budget = min(budget, args.kv_cache_memory_bytes)
    return max(budget // per_block, 0)


def allocate_kv_cache(config: ModelConfig, block_size: int, num_blocks: int) -> KVCaches:
    """Per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim], of this
    rank's KV heads (tensor parallelism)."""
    if num_blocks == 0:
        raise RuntimeError(
            "no memory left for the KV cache: raise kv_cache_memory (CPU) or gpu_memory_utilization (GPU)"
        )
    shape = (num_blocks, block_size, config.num_local_kv_heads, config.head_dim)
    return [(_zeros(shape, config), _zeros(shape, config)) for _ in range(config.num_layers)]


def _zeros(shape: tuple[int, ...], config: ModelConfig) -> torch.Tensor:
    """On the CPU, zeros from an anonymous memory map: the kernel hands its pages out zeroed as they
    are first written, so start-up does not write the whole cache (1 GiB took ~0.5 s on 2 cores)
    and resident memory grows with the blocks in use."""
    if config.device != "cpu":
        return torch.zeros(shape, dtype=config.cache_dtype, device=config.device)
    element_size = torch.empty(0, dtype=config.cache_dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * element_size), dtype=config.cache_dtype).view(shape)
