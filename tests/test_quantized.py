"""Compute on quantized weights (CPU): GGUF's Q4 and Q8_0 blocks taken exactly, pagedllm's
integer kernels and torch's against the dequantized weights, int4/int8 quantization at load,
per-layer error bounds, the kernel choice (compiler, CPU, switch), and greedy tokens against HF
on the bundled model."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.layers import cpu_kernels
from pagedllm.layers.cpu_kernels import Q4Blocks, Q8Blocks, Tiles
from pagedllm.layers.quantized_linear import (
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    BlockLinear,
    Int4Linear,
    Int8Linear,
    blocks_from_gguf,
    kernel_dtype,
    q4_from_float,
    q8_from_float,
)
from pagedllm.loader.gguf import iter_gguf_weights
from pagedllm.loader.quantize import StoredMatrix, quantize_model, read_gguf_blocks, tiles_from_gguf
from pagedllm.worker.kv_cache import resolve_kv_cache_dtype
from reference import check_logprobs_close, hf_greedy

needs_fast_kernel = pytest.mark.skipif(kernel_dtype() is None, reason="no AVX2: quantized layers stay dense")
needs_our_kernels = pytest.mark.skipif(cpu_kernels.lib() is None, reason="pagedllm's CPU kernels do not run here")


def _relative_error(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> float:
    want = x @ weight.t()
    return float((layer(x).float() - want).abs().max() / want.abs().max())


def _gguf_blocks(ggml_type: int, rows: int = 48, cols: int = 128) -> tuple[torch.Tensor, Q4Blocks | Q8Blocks]:
    """A random matrix quantized by gguf's own code: its dequantized values, and our blocks of it."""
    values = np.random.default_rng(ggml_type).standard_normal((rows, cols)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType(ggml_type)
    raw = gguf.quants.quantize(values, qtype)  # (rows, blocks x bytes)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    return reference, blocks_from_gguf(torch.from_numpy(raw).view(rows, cols // 32, -1), ggml_type)


@pytest.mark.parametrize("ggml_type", [GGML_Q4_0, GGML_Q4_1, GGML_Q8_0])
def test_gguf_blocks_are_taken_exactly(ggml_type):
    reference, weight = _gguf_blocks(ggml_type, rows=44)
    assert torch.equal(weight.dequantize(), reference)
    # The kernels' layout (8 rows interleaved, the last group padded) holds the same values.
    assert torch.equal(Tiles.of(weight).dequantize(), reference)


@pytest.mark.parametrize("ggml_type", [GGML_Q4_0, GGML_Q4_1])
def test_gguf_q4_blocks_map_exactly_onto_torchs_int4_kernel(ggml_type):
    """With float32 scales torch's kernel dequantizes to exactly gguf's values (an identity input
    reads the weights back), so the nibble order, scales and zero points are mapped without loss."""
    reference, weight = _gguf_blocks(ggml_type)
    read_back = Int4Linear(weight, compute_dtype=torch.float32)(torch.eye(128)).t()
    torch.testing.assert_close(read_back, reference, rtol=0, atol=1e-6)


@needs_our_kernels
@pytest.mark.parametrize("ggml_type", [GGML_Q4_0, GGML_Q4_1, GGML_Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 11, 100])
def test_our_kernels_compute_exact_integer_dot_products(ggml_type, rows):
    """Activations that int8 blocks hold exactly (127 steps of a power of two, the largest of each
    block at 127): then only float rounding separates the kernel from the float64 product --
    every nibble, scale, zero point and token row in its place. Token counts cover every tile
    width (1..6 tokens) and a second chunk of 96 tokens; outputs (N = 84) a partial group of 8."""
    reference, weight = _gguf_blocks(ggml_type, rows=84, cols=256)
    q = torch.randint(-127, 128, (rows, 256 // 32, 32))
    q[..., 0] = 127
    x = (q * 2.0 ** -7).float().flatten(1)
    want = x.double() @ reference.double().t()
    got = BlockLinear(weight)(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_bundled_model_q4_matrices_match_the_dequantizing_loader(bundled_gguf):
    packed = read_gguf_blocks(bundled_gguf)
    assert len(packed) == 211  # every Q4_1 matrix of the file and the Q8_0 embedding
    assert isinstance(packed["model.embed_tokens.weight"], Q8Blocks)
    dense = {}
    for name, tensor in iter_gguf_weights(bundled_gguf, torch.float32):
        if name.startswith(("model.layers.0.", "model.layers.29.")):
            dense[name] = tensor
    for name, tensor in dense.items():
        if name in packed:  # q/k rows unpermuted as the loader does
            assert torch.equal(packed[name].dequantize(), tensor), name


def _stored(ggml_type: int, rows: int, heads: int | None = None) -> StoredMatrix:
    values = np.random.default_rng(ggml_type + rows).standard_normal((rows, 128)).astype(np.float32)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(ggml_type))
    return StoredMatrix(torch.from_numpy(raw).view(rows, 4, -1), ggml_type, heads)


@pytest.mark.parametrize(
    "parts",
    [
        [(GGML_Q4_1, 64, 2), (GGML_Q4_1, 32, 1), (GGML_Q4_1, 32, None)],  # q/k/v: llama.cpp's row order undone
        [(GGML_Q4_0, 48, None), (GGML_Q4_1, 16, None)],  # types mixed among the parts
        [(GGML_Q4_0, 64, 2)],
        [(GGML_Q8_0, 40, None)],
    ],
)
def test_tiles_written_from_the_file_equal_the_blocks_reordered(parts):
    stored = [_stored(*part) for part in parts]
    tiles = tiles_from_gguf(stored)
    blocks = [m.blocks() for m in stored]
    want = Tiles.of(blocks[0] if len(blocks) == 1 else Q4Blocks.cat(blocks))
    assert torch.equal(tiles.qs, want.qs) and torch.equal(tiles.scales, want.scales) and tiles.rows == want.rows


def test_tiles_from_the_file_leave_what_does_not_fall_on_groups_of_8_to_the_blocks():
    assert tiles_from_gguf([_stored(GGML_Q4_1, 44)]) is None  # a partial group of 8
    assert tiles_from_gguf([_stored(GGML_Q4_1, 48, heads=4)]) is None  # half a head: 6 rows
    assert tiles_from_gguf([_stored(GGML_Q4_1, 32), _stored(GGML_Q8_0, 32)]) is None


@needs_fast_kernel
def test_per_layer_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    x = torch.randn(5, 256)
    q4, q8 = q4_from_float(w), q8_from_float(w)
    # Torch's kernels against their own dequantized weights: only bfloat16 activations and scales differ.
    assert _relative_error(Int4Linear(q4), q4.dequantize(), x) < 1e-2
    int8 = Int8Linear(w)
    assert _relative_error(int8, int8.dequantize(), x) < 1e-2
    # Against the float weights: 4-bit rounding (15 steps a block) on top, or 8-bit.
    assert _relative_error(Int4Linear(q4), w, x) < 0.1
    assert _relative_error(int8, w, x) < 2e-2
    if cpu_kernels.lib() is not None:  # ours: int8 activations (127 steps a block of 32)
        for blocks in (q4, q8):
            assert _relative_error(BlockLinear(blocks), blocks.dequantize(), x) < 2e-2
        assert _relative_error(BlockLinear(q4), w, x) < 0.1
        assert _relative_error(BlockLinear(q8), w, x) < 3e-2


def test_kernel_choice_by_cpu_capability():
    """With a capability named, torch's kernels: vectorized for bf16 activations on AVX2/AVX-512."""
    assert kernel_dtype("AVX512") == torch.bfloat16
    assert kernel_dtype("AVX2") == torch.bfloat16
    assert kernel_dtype("DEFAULT") is None  # scalar fallback only: slower than dense, keep dense
    model = nn.Sequential(nn.Linear(64, 32))
    assert quantize_model(model, "int4", capability="DEFAULT") == {"float32": 1}
    assert isinstance(model[0], nn.Linear)
    assert quantize_model(model, "int8", capability="AVX2") == {"int8": 1}
    assert isinstance(model[0], Int8Linear)
    odd = nn.Sequential(nn.Linear(48, 40))  # 40 outputs do not tile by 16: torch's int4 keeps it dense
    assert quantize_model(odd, "int4", capability="AVX2") == {"float32": 1}


@needs_our_kernels
def test_our_kernels_are_chosen_where_they_run():
    assert kernel_dtype() == torch.float32
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 8))  # 40 inputs are not blocks of 32: dense
    assert quantize_model(model, "int4") == {"int4": 1, "float32": 1}
    assert isinstance(model[0], BlockLinear) and isinstance(model[1], nn.Linear)


def test_kernel_instruction_set_by_cpu_flags():
    avx2 = {"avx2", "fma", "f16c"}
    assert cpu_kernels.best_isa(avx2) == "avx2"
    assert cpu_kernels.best_isa(avx2 | {"avx512_vnni"}) == "avx2"  # VNNI on 256-bit vectors needs AVX512VL
    assert cpu_kernels.best_isa(avx2 | {"avx512_vnni", "avx512vl", "avx_vnni"}) == "avx512vnni"
    assert cpu_kernels.best_isa(avx2 | {"avx_vnni"}) == "avxvnni"
    assert cpu_kernels.best_isa(avx2 | {"avx512_vnni", "avx512vl"}, cap="avx2") == "avx2"
    assert cpu_kernels.best_isa(avx2 | {"avx512_vnni", "avx512vl", "avx_vnni"}, cap="avxvnni") == "avxvnni"
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_ISA must be one of"):
        cpu_kernels.best_isa(avx2, cap="avx512")


@needs_our_kernels
@pytest.mark.skipif(cpu_kernels.best_isa(cpu_kernels._cpu_flags()) == "avx2", reason="no VNNI on this CPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_products_are_the_avx2_ones_bit_for_bit(bits):
    """The library this CPU gets (VNNI) and the AVX2 one every x86-64 CPU here can run: the same
    output bits on random weights and activations, every tile width and a partial group."""
    torch.manual_seed(bits)
    n, k = 84, 256
    if bits == 4:
        weight = Q4Blocks(torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8), (torch.rand(n, k // 32, 2) / 50).half())
    else:
        weight = Q8Blocks(torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n, k // 32) / 50).half())
    tiles, x = Tiles.of(weight), torch.randn(101, k)
    outputs = []
    for library in (cpu_kernels.load(), cpu_kernels.load("avx2")):
        y = torch.empty(x.shape[0], n)
        product = library.matmul_q4 if bits == 4 else library.matmul_q8
        assert product(tiles.qs.data_ptr(), tiles.scales.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0], n, k) == 0
        outputs.append(y)
    assert torch.equal(*outputs)
    want = x @ weight.dequantize().t()
    assert (outputs[0] - want).abs().max() < 3e-2 * want.abs().max()  # int8 activations (test_per_layer_error_bounds)


def test_kernels_fall_back_with_the_reason(monkeypatch, tmp_path, caplog):
    """No compiler, a compiler that fails, or the switch: None and a logged reason, never an error."""
    logger = logging.getLogger("pagedllm")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="pagedllm")
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.setenv("PAGEDLLM_CPU_KERNELS", "0")
        assert cpu_kernels.load() is None
        monkeypatch.delenv("PAGEDLLM_CPU_KERNELS")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert cpu_kernels.load() is None
        monkeypatch.setenv("CC", "false")  # found, but fails
        assert cpu_kernels.load() is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "PAGEDLLM_CPU_KERNELS=0" in caplog.text
    if cpu_kernels._unavailable() is None or "compiler" in caplog.text:  # on x86-64 with AVX2
        assert "no C compiler" in caplog.text and "compiling" in caplog.text


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
    assert "--quantization gguf" not in caplog.text  # the hint is for dense loads of the file
    layers = llm.engine.core.runner.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj, BlockLinear if cpu_kernels.lib() else Int4Linear)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "List three colors:"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))
    # Quantized activations: bfloat16 around torch's kernels; int8 blocks in ours, as llama.cpp
    # computes this file (measured: |logprob - HF's| 0.04 on average, 0.18 at most, over 40 tokens).
    atol = 0.25 if cpu_kernels.lib() is not None else 0.15
    for output in outputs:
        hf_tokens, hf_logprobs = hf_greedy(hf_model, output.prompt_token_ids, 8)
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs, atol=atol)


@needs_our_kernels
def test_llama_decode_step_in_one_call_gives_the_layers_outputs():
    """Decode-only steps of a Q4 Llama run every layer in one C call (models/llama_cpu_decode.py):
    the same kernels in the same order as the layers' forward, so the same tokens and logprobs,
    bit for bit, over a batch of sequences of different lengths (prefills take the layers)."""
    llm = LLM(dtype="float32", quantization="gguf", kv_cache_memory="64MiB", max_model_len=512)
    model = llm.engine.core.runner.model.model
    assert model.layers[0].self_attn.attn.k_cache.dtype == torch.float16  # auto: a half cache, as llama.cpp
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "List three colors:" * 5]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)
    fused = llm.generate(prompts, params, use_tqdm=False)
    assert type(model._cpu_decode).__name__ == "CpuDecodeLayers"
    model._cpu_decode = False  # the layers one by one
    layered = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused, layered):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: p.logprob for t, p in step.items()} for step in a.outputs[0].logprobs] == [
            {t: p.logprob for t, p in step.items()} for step in b.outputs[0].logprobs
        ]


@needs_our_kernels
def test_quantized_results_do_not_depend_on_how_a_prompt_was_cut_or_batched():
    """On the CPU kernels every token's work is the same float operations however its prompt was
    split: a whole prefill, the rest after a prefix-cache hit left by another request, or beside
    other requests in one batch. Int8 activations turn any ulp of difference into another rounding
    step (logprobs moved by up to 0.16 after another request's prefix hit, when prefills took
    torch's SDPA), so this is checked bit for bit."""
    import random

    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(32)]  # two full cache blocks
    prompts = [prefix[:16] + [rng.randrange(100, 40000) for _ in range(n)] for n in (1, 3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)

    def run(llm, batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return [[{t: p.logprob for t, p in step.items()} for step in o.outputs[0].logprobs] for o in outs]

    cold = LLM(dtype="float32", quantization="gguf", kv_cache_memory="64MiB", max_model_len=512, enable_prefix_caching=False)
    alone = [run(cold, [p])[0] for p in prompts]
    shared = LLM(dtype="float32", quantization="gguf", kv_cache_memory="64MiB", max_model_len=512)
    for prompt, want in zip(prompts, alone):
        run(shared, [prefix])  # leaves the first block of `prompt` in the prefix cache
        assert run(shared, [prompt])[0] == want
    assert run(cold, prompts) == alone


def test_llama_decode_step_stays_layered_where_it_does_not_fit(llm):
    """A dense float32 model (the session's `llm`) keeps its layers: the C step needs Q4 products."""
    llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.core.runner.model.model._cpu_decode is False


def test_kv_cache_dtype_resolution():
    """auto: the model's dtype, or float16 under CPU quantized compute in float32; a GPU cache must
    be the model's dtype (its kernels read that), said plainly."""
    assert resolve_kv_cache_dtype("auto", torch.float32, "cpu", "gguf") == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.float32, "cpu", None) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "cuda", None) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32, "cpu", None) == torch.float16
    assert resolve_kv_cache_dtype("float32", torch.float32, "cpu", "gguf") == torch.float32
    with pytest.raises(ValueError, match="the GPU attention kernels read a cache of the model's dtype"):
        resolve_kv_cache_dtype("float16", torch.bfloat16, "cuda:0", None)
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto"):
        EngineArgs(kv_cache_dtype="fp8")


def test_float16_kv_cache_of_a_dense_model_matches_hf(hf_model, caplog):
    """kv_cache_dtype=float16 on a dense float32 model: the cache is half (the log says so), the
    CPU kernels and torch's prefill read it back, and greedy tokens stay HF's."""
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        llm = LLM(dtype="float32", kv_cache_dtype="float16", kv_cache_memory="64MiB", max_model_len=512)
    assert "GiB float16, cpu" in caplog.text
    # the file's Q4 matrices were dequantized: the log names the option that keeps them
    assert ("stores 4-bit weights, dequantized here; quantization='gguf' (--quantization gguf)" in caplog.text) == (cpu_kernels.lib() is not None)
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    for output in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=3), use_tqdm=False):
        hf_tokens, hf_logprobs = hf_greedy(hf_model, output.prompt_token_ids, 8)
        check_logprobs_close(output.outputs[0], hf_tokens, hf_logprobs, atol=0.02)
