"""Dense CPU matmuls on oneDNN-reordered weights (layers/cpu_packed.py): the same products as
F.linear, every dense layer swapped at load, and the dtype dispatch of this machine's CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.cpu_packed import PackedLinear, pack_model, packed_linear, packed_weight

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 32, 257])
def test_packed_products_equal_f_linear_to_float32_rounding(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(384, 576, generator=gen), torch.randn(384, generator=gen)
    x = torch.randn(2, rows, 576, generator=gen)  # leading dimensions are kept
    want = F.linear(x, weight, bias)
    got = PackedLinear(packed_weight(weight), bias)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed_linear(x, packed_weight(weight)), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_bfloat16_is_packed_only_where_onednn_has_the_instructions():
    """oneDNN reorders bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2 machine the
    layer must stay on F.linear (None), elsewhere the packed product must match."""
    weight = torch.randn(64, 128).bfloat16()
    packed = packed_weight(weight)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        assert packed is None
    if packed is not None:
        x = torch.randn(5, 128).bfloat16()
        torch.testing.assert_close(packed_linear(x, packed).float(), F.linear(x, weight).float(), rtol=2e-2, atol=5e-2)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_pack_model_swaps_every_dense_linear_and_keeps_outputs(monkeypatch):
    model = _Tiny().eval().requires_grad_(False)
    x = torch.randn(7, 16)
    want = model(x)
    assert pack_model(model) == 2
    assert type(model.up) is PackedLinear and type(model.down) is PackedLinear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert pack_model(model) == 0  # nothing left to swap

    monkeypatch.setenv("PAGEDLLM_CPU_PACKED_LINEAR", "0")
    plain = _Tiny()
    assert pack_model(plain) == 0 and type(plain.up) is nn.Linear


def test_a_gguf_packed_before_loading_holds_the_weights_packing_after_loading_gives(monkeypatch):
    """loader/gguf_packed.py: each matrix dequantized from the file into the shared scratch and packed
    there equals the one loaded dense and packed after loading, bit for bit, and the loader reads none
    of them (the bundled model: 30 layers x 4 merged matrices, from 7 tensors a layer)."""
    from pagedllm.config import EngineArgs
    from pagedllm.loader import gguf_packed, model_loader

    pack_before_loading, taken = gguf_packed.pack_before_loading, []

    def recording(*args):
        taken.append(pack_before_loading(*args))
        return taken[-1]

    monkeypatch.setattr(gguf_packed, "pack_before_loading", recording)
    packed_first = model_loader.load_model(EngineArgs(dtype="float32")).model
    monkeypatch.setattr(gguf_packed, "pack_before_loading", lambda *args: set())
    loaded_first = model_loader.load_model(EngineArgs(dtype="float32")).model

    assert len(taken[0]) == 30 * 7
    packed = {name: m for name, m in packed_first.named_modules() if type(m) is PackedLinear}
    assert len(packed) == 30 * 4 + 1  # and the logits table, packed after loading either way
    for name, layer in loaded_first.named_modules():
        if type(layer) is PackedLinear:
            assert torch.equal(packed.pop(name).weight.to_dense(), layer.weight.to_dense()), name
    assert not packed
