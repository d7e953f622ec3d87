"""The fused all-reduce + residual add + RMSNorm (distributed/triton_all_reduce_norm.py) and its
wiring (layers/all_reduce_norm.py), on CPU.

The kernel runs through Triton's interpreter as one rank of a group whose peers have already
done their part: their partial sums sit in this rank's inbox, the rest of it is marked empty, so
it reads them without waiting. Its outputs must equal the unfused path -- the sum over the ranks
rounded to the dtype, then layers/triton_ops.rms_norm with the residual -- exactly; it must
leave its own rows in each peer's inbox (-0.0 sent as +0.0) and its own inbox empty again.
scripts/gpu_all_reduce_norm_check.py runs it for real between two GPUs.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
from transformers import LlamaConfig

pytest.importorskip("triton")

from pagedllm.distributed import TensorParallelGroup, building_for  # noqa: E402
from pagedllm.distributed.triton_all_reduce_norm import LARGE, all_reduce_add_rms_norm, as_bits, mark_empty  # noqa: E402
from pagedllm.layers import triton_ops  # noqa: E402
from pagedllm.layers.all_reduce_norm import DeferredAllReduce, defer_all_reduces  # noqa: E402
from pagedllm.layers.linear import RowParallelLinear  # noqa: E402
from pagedllm.models.llama import LlamaModel  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("world", "rank"), [(2, 0), (2, 1), (3, 1)])
@pytest.mark.parametrize(("rows", "hidden", "programs"), [(1, 96, 4), (5, 576, 4), (7, 100, 3), (LARGE + 7, 40, 5)])
def test_kernel_matches_the_unfused_path(dtype, world, rank, rows, hidden, programs):
    gen = torch.Generator().manual_seed(rows * 1000 + hidden + rank)
    partials = [torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(world)]
    partials[rank][0, :3] = torch.tensor([-0.0, 0.0, -0.0])  # zeros of either sign, sent as +0.0
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    size = rows * hidden + 5  # slots are longer than a call's rows

    def empty_slot() -> torch.Tensor:
        slot = torch.empty(size, dtype=dtype)
        mark_empty(slot)
        return slot

    sends = [empty_slot() for _ in range(world)]  # this rank's slot in each peer's inbox
    inbox = [empty_slot() for _ in range(world)]  # each peer's slot in this rank's
    for peer in range(world):
        if peer != rank:
            inbox[peer][: rows * hidden] = partials[peer].flatten()

    out, res_out = all_reduce_add_rms_norm(partials[rank], residual, weight, 1e-5, tuple(sends), tuple(inbox), rank, programs)

    summed = sum(p.float() for p in partials).to(dtype)  # the unfused all-reduce's result
    want_out, want_res = triton_ops.rms_norm(summed, weight, 1e-5, residual)
    assert torch.equal(res_out, want_res)
    assert torch.equal(out, want_out)
    sent = partials[rank].flatten() + 0.0  # -0.0 + 0.0 = +0.0
    for peer in range(world):
        if peer != rank:
            assert as_bits(sends[peer][: rows * hidden]).equal(as_bits(sent)), f"this rank's rows in rank {peer}'s inbox"
            assert as_bits(inbox[peer]).equal(as_bits(empty_slot())), f"rank {peer}'s slot read and marked empty again"
            assert as_bits(sends[peer][rows * hidden :]).equal(as_bits(empty_slot()[rows * hidden :])), "nothing past the rows"


def _llama(world_size: int, bias: bool = False) -> LlamaModel:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attention_bias=bias)
    with building_for(TensorParallelGroup(rank=0, world_size=world_size)):
        return LlamaModel(config)


def test_every_boundary_is_linked_with_alternating_halves():
    model = _llama(2)
    boundaries = model._sublayer_boundaries()
    assert len(boundaries) == 6 and boundaries[-1][1] is model.norm and boundaries[1][1] is model.layers[1].input_layernorm
    assert defer_all_reduces(boundaries)
    for i, (linear, norm) in enumerate(boundaries):
        assert linear.reduce_results is False
        assert norm.deferred_all_reduce == DeferredAllReduce(linear.tp, i % 2)
    assert model.layers[0].input_layernorm.deferred_all_reduce is None  # after the embedding: no residual


@pytest.mark.parametrize("why", ["one rank", "bias", "switched off", "a swapped layer"])
def test_nothing_is_linked_where_one_boundary_does_not_qualify(why, monkeypatch):
    model = _llama(1 if why == "one rank" else 2, bias=why == "bias")
    if why == "switched off":
        monkeypatch.setenv("PAGEDLLM_FUSED_ALL_REDUCE_NORM", "0")
    if why == "a swapped layer":  # as quantization swaps a linear for a twin that reduces itself
        model.layers[1].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)
    assert not defer_all_reduces(model._sublayer_boundaries())
    assert all(type(m) is not RowParallelLinear or m.reduce_results for m in model.modules())
    assert all(getattr(m, "deferred_all_reduce", None) is None for m in model.modules())
