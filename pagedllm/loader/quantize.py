"""`quantization=gguf|int4|int8`: swap a model's linear layers for ones that compute on
quantized weights (layers/quantized_linear.py), and say which layer computes in which format.
int4 and int8 quantize the loaded weights; gguf swaps before the weights are loaded, and the
loader then skips the tensors the quantized layers hold as blocks (never dequantized).

    gguf  the GGUF file's Q4_0 / Q4_1 matrices as they are stored (no rounding of the values),
          and with pagedllm's kernels its Q8_0 logits table (the LM head, or the tied
          embedding: lookups still read the dense table); matrices of other types stay dense
    int4  any checkpoint: blocks of 32 quantized at load (asymmetric, round to nearest)
    int8  any checkpoint: symmetric int8, per block of 32 (pagedllm's kernels) or per row (torch's)

Merged projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj) are packed from their GGUF parts
when all the parts are Q4; the model class lists the merges (`stacked_weights`). With int4 and
int8 the embedding and the LM head stay dense.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.layers.cpu_kernels import BLOCK, Q4Blocks, Q8Blocks, Tiles
from pagedllm.layers.quantized_linear import (
    BLOCK_BYTES,
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    QUANTIZATIONS,
    BlockLinear,
    blocks_from_gguf,
    kernel_dtype,
    quantized_from,
)
from pagedllm.layers.vocab_parallel import logits_table
from pagedllm.models.weights import stacked_parts

if TYPE_CHECKING:
    from pagedllm.loader.gguf import GGUFHeader

logger = logging.getLogger("pagedllm")


@dataclass(frozen=True)
class StoredMatrix:
    """A Q4_0 / Q4_1 / Q8_0 matrix of a GGUF file as stored: a view of the mapped file's bytes."""

    raw: torch.Tensor  # (N, K / 32, block bytes) uint8, rows in the file's order
    ggml_type: int
    permuted_heads: int | None  # llama.cpp's q/k row order, undone on the way out (gguf._unpermute_rotary)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] * BLOCK

    @property
    def is_q4(self) -> bool:
        return self.ggml_type != GGML_Q8_0

    def blocks(self) -> Q4Blocks | Q8Blocks:
        """The values as blocks, rows in HF order (a copy)."""
        from pagedllm.loader import gguf

        raw = self.raw if self.permuted_heads is None else gguf._unpermute_rotary(self.raw, self.permuted_heads)
        return blocks_from_gguf(raw, self.ggml_type)

    def hf_rows(self, unit: torch.dtype) -> torch.Tensor | None:
        """The bytes as `unit`s in HF row order, rows split as (*outer, 8, K / 32, units a block): a view
        (the q/k order undone by its strides, no copy); None where a head's half is not a multiple of 8 rows."""
        raw = self.raw.view(unit)
        n, heads = raw.shape[0], self.permuted_heads
        if heads is None:
            return raw.unflatten(0, (n // 8, 8))
        half = n // heads // 2  # GGUF rows (head, i, half) -> HF rows (head, half, i)
        if half % 8:
            return None
        return raw.view(heads, half, 2, *raw.shape[1:]).transpose(1, 2).unflatten(2, (half // 8, 8))


def stored_matrices(source: str | GGUFHeader) -> dict[str, StoredMatrix]:
    """The Q4_0 / Q4_1 / Q8_0 matrices of a GGUF file (its path, or its header once read), by
    transformers parameter name; nothing is read until they are copied out."""
    from pagedllm.loader import gguf

    header = source if isinstance(source, gguf.GGUFHeader) else gguf.read_gguf_header(source)
    arch, heads = gguf.architecture_of(header), gguf.permuted_heads(header)
    out = {}
    data = gguf.map_file(header.path)  # never written: the blocks and tiles are copies
    for info in header.tensors:
        if info.ggml_type not in BLOCK_BYTES or len(info.shape) != 2:
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        kind = info.name.split(".")[-2]
        blocks = raw.view(info.shape[0], -1, BLOCK_BYTES[info.ggml_type])  # (N, K / 32, bytes)
        out[arch.hf_name(info.name)] = StoredMatrix(blocks, info.ggml_type, heads.get(kind))
    return out


def read_gguf_blocks(source: str | GGUFHeader) -> dict[str, Q4Blocks | Q8Blocks]:
    """The Q4_0 / Q4_1 / Q8_0 matrices of a GGUF file as blocks, by transformers parameter name (q/k
    rows put back in HF order, as the dequantizing loader does)."""
    return {name: matrix.blocks() for name, matrix in stored_matrices(source).items()}


def tiles_from_gguf(parts: list[StoredMatrix]) -> Tiles | None:
    """The kernels' tiles of the parts' rows stacked, written straight from the mapped file: one copy of
    each part's values and one of its scales, the q/k row order undone by the source's strides (blocks
    then Tiles.of take five passes). None where a part's rows do not make whole groups of 8, or where
    Q4 and Q8 parts would mix."""
    if len({p.is_q4 for p in parts}) != 1 or any(p.shape[0] % 8 for p in parts):
        return None
    views = [(p.hf_rows(_UNITS[p.ggml_type]), p.hf_rows(torch.float16)) for p in parts]
    if any(values is None for values, _ in views):
        return None
    tiles = Tiles.empty(4 if parts[0].is_q4 else 8, sum(p.shape[0] for p in parts), parts[0].shape[1])
    qs_rows, scale_rows = tiles.row_views()  # (groups, 8, K / 32, quads, 4) bytes, (groups, 8, K / 32, 2 | 1)
    start = 0
    for part, (values, halves) in zip(parts, views):
        rows, outer = slice(start // 8, (start + part.shape[0]) // 8), values.shape[:-3]
        unit = values.dtype
        # Block layouts: Q4_1 [d m | 16 B], Q4_0 [d | 16 B], Q8_0 [d | 32 B]; units of 2 or 4 bytes, not bytes.
        skip = 4 // unit.itemsize if part.ggml_type == GGML_Q4_1 else 1
        into = qs_rows[rows].view(unit).unflatten(0, outer)  # (*outer, 8, K / 32, quads, units a quad)
        into.copy_(values[..., skip:].unflatten(-1, into.shape[-2:]))
        scales = scale_rows[rows].unflatten(0, outer)
        if part.ggml_type == GGML_Q4_0:  # m = -8 d, exact
            scales.copy_(halves[..., :1].expand(*halves.shape[:-1], 2))
            scales[..., 1].mul_(-8)
        else:
            scales.copy_(halves[..., : scales.shape[-1]])
        start += part.shape[0]
    return tiles


# The unit a block's bytes are copied in: its values start on a multiple of it.
_UNITS = {GGML_Q4_1: torch.int32, GGML_Q4_0: torch.int16, GGML_Q8_0: torch.int16}


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _fits(layer: nn.Linear, method: str, compute: torch.dtype) -> bool:
    """Whether the kernel takes this shape: inputs in blocks of 32 (torch's int8 kernel takes
    any), and for torch's int4 kernel outputs by 16."""
    if compute == torch.float32:
        return layer.in_features % BLOCK == 0
    return method == "int8" or (layer.in_features % BLOCK == 0 and layer.out_features % 16 == 0)


def quantize_model(model: nn.Module, method: str, gguf_path: str | None = None, capability: str | None = None) -> dict[str, int]:
    """Swap the linear layers of a loaded model in place; returns {format: number of layers}, which is logged."""
    if method == "gguf" and gguf_path is None:
        raise ValueError("quantization=gguf computes on a GGUF file's own 4-bit weights: load a .gguf model, or use int4 or int8")
    return _swap_layers(model, method, gguf_path, capability).formats


def quantize_before_loading(model: nn.Module, gguf: GGUFHeader, capability: str | None = None) -> set[str]:
    """quantization=gguf on a model built but not yet loaded: the quantized layers take the file's
    blocks and nothing from the dense weights, so the loader skips their tensors, which are then
    never dequantized. Returns those tensors' (transformers) names."""
    return _swap_layers(model, "gguf", gguf, capability).taken


@dataclass(frozen=True)
class _Swapped:
    formats: dict[str, int]  # format -> number of linear layers
    taken: set[str]  # checkpoint tensors the quantized layers hold as blocks (method gguf)


def _swap_layers(model: nn.Module, method: str, gguf: str | GGUFHeader | None, capability: str | None) -> _Swapped:
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {method!r}")
    layers = _linear_layers(model)
    dense_format = str(next(model.parameters()).dtype).removeprefix("torch.")
    compute = kernel_dtype(capability)
    if compute is None or next(model.parameters()).device.type != "cpu":
        logger.warning(
            "quantization=%s: no fast quantized kernel on this %s (needs an x86 CPU with AVX2); layers stay %s",
            method, torch.backends.cpu.get_cpu_capability(), dense_format,
        )
        return _Swapped({dense_format: len(layers)}, set())
    stored = stored_matrices(gguf) if method == "gguf" else {}
    stacked = getattr(type(model), "stacked_weights", [])
    formats: collections.Counter = collections.Counter()
    kinds: dict[str, set[str]] = collections.defaultdict(set)
    taken: set[str] = set()
    for name, layer in layers:
        parent_name, _, leaf = name.rpartition(".")
        part_names = stacked_parts(name, stacked) if method == "gguf" else []
        parts = [stored.get(p) for p in part_names]
        # Dense stay: GGUF layers with a part that is not Q4, and shapes the kernel cannot take.
        fits = _fits(layer, method, compute) and all(p is not None and p.is_q4 for p in parts)
        fmt = ("int8" if method == "int8" else "int4") if fits else dense_format
        formats[fmt] += 1
        kinds[fmt].add(leaf)
        if fmt != dense_format:
            weight = _gguf_weight(parts, compute) if parts else None
            quantized = quantized_from(layer, weight, fmt, compute)
            if layer.bias is not None:  # the same parameter, which a loader still to come fills (its shard slices)
                quantized.bias = layer.bias
            setattr(model.get_submodule(parent_name), leaf, quantized)
            taken.update(part_names)
    head, head_taken = _quantized_logits(model, stored) if compute == torch.float32 else (None, None)
    if head_taken:
        taken.add(head_taken)
    summary = "; ".join(f"{n} layers {fmt} ({', '.join(sorted(kinds[fmt]))})" for fmt, n in formats.items())
    logger.info(
        "quantization=%s: %s; %s; embedding %s, LM head %s",
        method,
        summary,
        "pagedllm's AVX2 kernels, int8 activations" if compute == torch.float32 else f"torch's kernels, {compute} activations",
        dense_format,
        head or dense_format,
    )
    return _Swapped(dict(formats), taken)


def _gguf_weight(parts: list[StoredMatrix], compute: torch.dtype) -> Q4Blocks | Q8Blocks | Tiles:
    """pagedllm's kernels take tiles, written straight from the file where the rows allow; torch's take blocks."""
    tiles = tiles_from_gguf(parts) if compute == torch.float32 else None
    if tiles is not None:
        return tiles
    blocks = [p.blocks() for p in parts]
    return blocks[0] if len(blocks) == 1 else Q4Blocks.cat(blocks)


def _quantized_logits(model: nn.Module, stored: dict[str, StoredMatrix]) -> tuple[str | None, str | None]:
    """Score logits on the GGUF's own Q8_0 table, if it has one. Returns (its format, else None;
    the table's tensor name where the dense table is no longer needed, else None)."""
    table = logits_table(model)
    name = next((n for n, m in model.named_modules() if m is table), None)
    matrix = stored.get(f"{name}.weight") if table is not None and table.tp.world_size == 1 else None
    if matrix is None or matrix.ggml_type != GGML_Q8_0 or matrix.shape != tuple(table.weight.shape):
        return None, None
    table.logits_layer = BlockLinear(_gguf_weight([matrix], torch.float32))
    if getattr(model, "tie_word_embeddings", False):  # lookups still read the dense table
        return "int8 (GGUF Q8_0)", None
    table.weight.data = table.weight.data.new_empty(0, table.weight.shape[1])  # scored only through logits()
    return "int8 (GGUF Q8_0)", f"{name}.weight"
