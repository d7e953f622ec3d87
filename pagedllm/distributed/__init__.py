"""Tensor parallelism over torch.distributed: process groups and collectives."""

from pagedllm.distributed.parallel_state import (
    SINGLE_RANK,
    TensorParallelGroup,
    building_for,
    get_tp_group,
    shard_range,
)

__all__ = ["SINGLE_RANK", "TensorParallelGroup", "building_for", "get_tp_group", "shard_range"]
