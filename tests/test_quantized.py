"""Compute on quantized weights (CPU): GGUF's Q4 blocks packed exactly for torch's int4 kernel,
int4/int8 quantization at load, per-layer error bounds, the kernel choice by CPU capability, and
greedy tokens against HF on the bundled model."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantized_linear import (
    GGML_Q4_0,
    GGML_Q4_1,
    Int4Linear,
    Int8Linear,
    int4_from_float,
    int4_from_gguf,
    kernel_dtype,
)
from pagedllm.loader.gguf import iter_gguf_weights
from pagedllm.loader.quantize import quantize_model, read_gguf_int4
from reference import check_logprobs_close, hf_greedy

needs_fast_kernel = pytest.mark.skipif(kernel_dtype() is None, reason="no AVX2: quantized layers stay dense")


def _relative_error(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> float:
    want = x @ weight.t()
    return float((layer(x).float() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("ggml_type", [GGML_Q4_0, GGML_Q4_1])
def test_gguf_q4_blocks_map_exactly_onto_the_int4_kernel(ggml_type):
    """With float32 scales the kernel dequantizes to exactly gguf's values (an identity input reads
    the weights back), so the nibble order, scales and zero points are mapped without loss."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((48, 128)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType(ggml_type)
    raw = gguf.quants.quantize(values, qtype)  # (48, 4 blocks x bytes)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    weight = int4_from_gguf(torch.from_numpy(raw).view(48, 4, -1), ggml_type)
    assert torch.equal(weight.dequantize(), reference)
    read_back = Int4Linear(weight, compute_dtype=torch.float32)(torch.eye(128)).t()
    torch.testing.assert_close(read_back, reference, rtol=0, atol=1e-6)


def test_bundled_model_q4_matrices_match_the_dequantizing_loader(bundled_gguf):
    packed = read_gguf_int4(bundled_gguf)
    assert len(packed) == 210  # every Q4_1 matrix of the file (the Q8_0 embedding is not int4)
    dense = {}
    for name, tensor in iter_gguf_weights(bundled_gguf, torch.float32):
        if name.startswith(("model.layers.0.", "model.layers.29.")):
            dense[name] = tensor
    for name, tensor in dense.items():
        if name in packed:  # q/k rows unpermuted as the loader does
            assert torch.equal(packed[name].dequantize(), tensor), name


@needs_fast_kernel
def test_per_layer_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    x = torch.randn(5, 256)
    q4 = int4_from_float(w)
    # The kernel against its own dequantized weights: only the bfloat16 activations and scales differ.
    assert _relative_error(Int4Linear(q4), q4.dequantize(), x) < 1e-2
    # Against the float weights: 4-bit rounding (15 steps a group) on top.
    assert _relative_error(Int4Linear(q4), w, x) < 0.1
    int8 = Int8Linear(w)
    assert _relative_error(int8, int8.dequantize(), x) < 1e-2
    assert _relative_error(int8, w, x) < 2e-2


def test_kernel_choice_by_cpu_capability():
    assert kernel_dtype("AVX512") == torch.bfloat16  # x86 tinygemm: vectorized for bf16 activations
    assert kernel_dtype("AVX2") == torch.bfloat16
    assert kernel_dtype("DEFAULT") is None  # scalar fallback only: slower than dense, keep dense
    model = nn.Sequential(nn.Linear(64, 32))
    assert quantize_model(model, "int4", capability="DEFAULT") == {"float32": 1}
    assert isinstance(model[0], nn.Linear)
    assert quantize_model(model, "int8", capability="AVX2") == {"int8": 1}
    assert isinstance(model[0], Int8Linear)
    odd = nn.Sequential(nn.Linear(48, 40))  # 40 outputs do not tile by 16: int4 keeps it dense
    assert quantize_model(odd, "int4", capability="AVX2") == {"float32": 1}


def test_gguf_quantization_needs_a_gguf_model():
    with pytest.raises(ValueError, match="load a .gguf model"):
        quantize_model(nn.Sequential(nn.Linear(64, 32)), "gguf", capability="AVX2")
    with pytest.raises(ValueError, match="quantization must be"):
        LLM(quantization="int3")


@needs_fast_kernel
def test_gguf_quantized_greedy_matches_hf(hf_model, caplog):
    logger = logging.getLogger("pagedllm")  # it does not propagate to the root logger caplog watches
    logger.addHandler(caplog.handler)
    try:
        llm = LLM(dtype="float32", quantization="gguf", kv_cache_memory="64MiB", max_model_len=512)
    finally:
        logger.removeHandler(caplog.handler)
    assert "120 layers int4 (down_proj, gate_up_proj, o_proj, qkv_proj)" in caplog.text
    layers = llm.engine.core.runner.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj, Int4Linear)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "List three colors:"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))
    for output in outputs:
        hf_tokens, hf_logprobs = hf_greedy(hf_model, output.prompt_token_ids, 8)
        # bfloat16 activations and scales around the int4 kernel: a looser logprob tolerance.
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs, atol=0.15)
