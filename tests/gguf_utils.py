"""Small random GGUF files written with gguf-py's GGUFWriter, for checking pagedllm against
transformers loading the same file.

Quantized tensors are made two ways: gguf-py quantizes normal floats to the types it can
(Q4_0, Q5_0, Q8_0, ...); the K-quants, which it can only read, get random packed bytes under
scales chosen so values come out zero-mean at about `std`.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from pagedllm.loader.gguf_quants import BLOCK_SIZES

Q = gguf.GGMLQuantizationType
# K-quant -> ((byte offset of d, of dmin or None), |q * scale| of a typical value per unit of d)
_K_SCALES = {
    Q.Q2_K: ((80, 82), 7.5 * 1.5),
    Q.Q3_K: ((108, None), 16 * 2.0),
    Q.Q4_K: ((0, 2), 31.5 * 7.5),
    Q.Q5_K: ((0, 2), 31.5 * 15.5),
    Q.Q6_K: ((208, None), 64 * 16.0),
}
# A block's mean is d * mean(scale) * mean(q) - dmin * mean(min); this dmin/d ratio zeroes it.
_K_DMIN_RATIO = {Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}


def random_k_quant(rng: np.random.Generator, shape: tuple[int, int], qtype: Q, std: float) -> np.ndarray:
    """(rows, bytes per row) uint8 of random K-quant blocks whose values have roughly `std`."""
    block_size, block_bytes = BLOCK_SIZES[qtype]
    num_blocks = shape[0] * shape[1] // block_size
    blocks = rng.integers(0, 256, (num_blocks, block_bytes), dtype=np.uint8)
    (d_at, dmin_at), typical = _K_SCALES[qtype]
    d = (np.abs(rng.standard_normal((num_blocks, 1))) * std / typical + std / typical / 4).astype(np.float16)
    blocks[:, d_at : d_at + 2] = d.view(np.uint8)
    if dmin_at is not None:
        blocks[:, dmin_at : dmin_at + 2] = (d.astype(np.float32) * _K_DMIN_RATIO[qtype]).astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def tokenizer_metadata(source_gguf: str) -> dict[str, Any]:
    """The tokenizer.* metadata of an existing GGUF (the bundled SmolLM2's: a 49k byte-level BPE)."""
    from pagedllm.loader.gguf import read_gguf_header

    return {k: v for k, v in read_gguf_header(source_gguf).metadata.items() if k.startswith("tokenizer.")}


def write_gguf(
    path: str,
    architecture: str,
    hparams: dict[str, Any],
    tensors: dict[str, tuple[tuple[int, ...], Q]],
    tokenizer: dict[str, Any],
    seed: int = 0,
    std: float = 0.05,
) -> None:
    """hparams: "{architecture}.<key>" metadata without the prefix (ints, floats, bools);
    tensors: GGUF name -> (torch-order shape, type); 1-D tensors are norms around 1 unless
    their name ends in ".bias"."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in hparams.items():
        _add(writer, f"{architecture}.{key}", value)
    for key, value in tokenizer.items():
        _add(writer, key, value)
    for name, (shape, qtype) in tensors.items():
        if len(shape) == 1:
            values = (rng.standard_normal(shape) * 0.1 + (0 if name.endswith(".bias") else 1)).astype(np.float32)
        else:
            values = (rng.standard_normal(shape) * std).astype(np.float32)
        if qtype in _K_SCALES:
            writer.add_tensor(name, random_k_quant(rng, shape, qtype, std), raw_dtype=qtype)
        else:
            add_float_tensor(writer, name, values, qtype)
    finish(writer)


def add_float_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> None:
    """float32 values stored as F32, F16, or a type gguf-py can quantize to."""
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, values.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:  # a list: gguf-py types it by its first element (int32, float32 or string)
        writer.add_array(key, value)


def decoder_tensors(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int,
                    types: dict[str, Q], extra_layer: dict[str, tuple[int, ...]] | None = None,
                    tied: bool = False) -> dict[str, tuple[tuple[int, ...], Q]]:
    """The llama-shaped tensor table: `types` gives each kind's type (default F32 for 1-D)."""
    layer_shapes = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (heads * head_dim, hidden),
        "attn_k.weight": (kv_heads * head_dim, hidden),
        "attn_v.weight": (kv_heads * head_dim, hidden),
        "attn_output.weight": (hidden, heads * head_dim),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (ffn, hidden),
        "ffn_up.weight": (ffn, hidden),
        "ffn_down.weight": (hidden, ffn),
        **(extra_layer or {}),
    }
    tensors = {"token_embd.weight": ((vocab, hidden), types.get("token_embd", Q.Q8_0))}
    for i in range(layers):
        for kind, shape in layer_shapes.items():
            tensors[f"blk.{i}.{kind}"] = (shape, Q.F32 if len(shape) == 1 else types.get(kind.split(".")[0], Q.F32))
    tensors["output_norm.weight"] = ((hidden,), Q.F32)
    if not tied:
        tensors["output.weight"] = ((vocab, hidden), types.get("output", Q.Q6_K))
    return tensors
