"""Rotary position embeddings (the "rotate half" / NeoX layout that HF Llama uses),
with the Llama 3 frequency scaling."""

from __future__ import annotations

import json
import math
import weakref

import torch
from torch import nn

from pagedllm.layers.fused import fused_ops_for


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_parameters(hf_config) -> tuple[float, dict | None]:
    """(theta, scaling dict or None), from either transformers 4 or 5 style configs."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return theta, (params if rope_type not in ("default", None) else None)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        # float32 throughout, as transformers computes it, so positions far out agree bit for bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if rope_type == "llama3":
            inv_freq = _llama3_scaled(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type is not None:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_position, head_dim / 2)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

        self._step: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (T, H, D), k: (T, Hkv, D), positions: (T,). With a fused kernel (CUDA, CPU float32)
        q and k are rotated in place and returned; use the returned tensors either way."""
        ops = fused_ops_for(q)
        if ops is not None:
            return ops.rotary_inplace_(positions, q, k, self.cos_sin)
        cos, sin = self._cos_sin(positions)  # (T, 1, D)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos = [c | c] and sin = [-s | s] at each position, (T, 1, D) float32."""
        # One table serves every layer (get_rotary_embedding), so on CPU, where each op costs more
        # than its arithmetic, the first layer's lookup is kept for the rest of the step. The key is
        # the positions tensor itself (held, so its id is not reused). Not on GPUs: a CUDA graph
        # replays its captured lookup on a static positions buffer whose contents change.
        if self._step is not None and self._step[0] is positions:
            return self._step[1]
        cos, sin = self.cos_sin.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)  # (T, 1, D/2)
        cos_sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (T, 1, D), sin sign-folded
        if positions.device.type == "cpu":
            self._step = (positions, cos_sin)
        return cos_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin], with cos = [c | c], sin = [-s | s]:
    the same roundings as HF's x * cos + rotate_half(x) * sin, in fewer ops."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def get_rotary_embedding(head_dim: int, max_position: int, theta: float, scaling: dict | None = None) -> RotaryEmbedding:
    """One table shared by every layer of a model: Llama 3.2's 131072 positions make a 32 MiB
    table that takes ~0.4 s to build, once rather than once per layer. Held weakly, so it goes
    with the last model using it."""
    key = (head_dim, max_position, theta, json.dumps(scaling, sort_keys=True), str(torch.get_default_device()))
    rotary = _SHARED.get(key)
    if rotary is None:
        rotary = _SHARED[key] = RotaryEmbedding(head_dim, max_position, theta, scaling)
    return rotary
