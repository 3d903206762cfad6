"""Rotary position embeddings: cos/sin tables for the plain, linear, dynamic-NTK and YaRN variants
(applying them is `dispatch.rotary`).

Tables are computed in float32 from float32 positions and cast to the activation dtype at use
(the reference behaviour under `torch_dtype=bfloat16`;
docs/deviations.md#rope-tables-stay-float32-however-the-model-is-cast).
They are cached per device for `max_position_embeddings` positions and looked up by position id,
so a decode step does no table work and can be captured in a CUDA graph.
"""
import math
from typing import Optional

import torch


class RotaryEmbedding:
    """cos/sin for `dim` rotary dims; `lookup(position_ids, dtype)` gives two [B, S, dim] tensors."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float, scaling: Optional[dict] = None):
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.scaling = dict(scaling or {})
        self.kind = self.scaling.get("type", self.scaling.get("rope_type", "default")) if scaling else "default"
        self.attention_scale = 1.0  # yarn multiplies the softmax scale by this
        self.table_scale = 1.0      # yarn multiplies cos/sin by this
        if self.kind == "yarn":
            factor = self.scaling["factor"]
            mscale = _yarn_mscale(factor, self.scaling.get("mscale", 1))
            mscale_all_dim = self.scaling.get("mscale_all_dim", 0)
            self.table_scale = mscale / _yarn_mscale(factor, mscale_all_dim)
            if mscale_all_dim:
                self.attention_scale = _yarn_mscale(factor, mscale_all_dim) ** 2
        self._tables = {}

    def inv_freq(self, base: Optional[float] = None) -> torch.Tensor:
        base = self.base if base is None else base
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        plain = 1.0 / (base ** exponent)
        if self.kind != "yarn":
            return plain
        factor = self.scaling["factor"]
        original = self.scaling.get("original_max_position_embeddings", 4096)
        low, high = _yarn_correction_range(
            self.scaling.get("beta_fast", 32), self.scaling.get("beta_slow", 1), self.dim, base, original
        )
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp
        return (plain / factor) * (1 - extrapolate) + plain * extrapolate

    def _table(self, length: int, device, base: Optional[float] = None):
        t = torch.arange(length, dtype=torch.float32, device=device)
        if self.kind == "linear":
            t = t / self.scaling["factor"]
        freqs = torch.outer(t, self.inv_freq(base).to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.table_scale, emb.sin() * self.table_scale

    def lookup(self, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: Optional[int] = None):
        """cos, sin at `position_ids` ([B, S] or [S]); `seq_len` (the attended length) only matters for
        dynamic NTK scaling beyond max_position_embeddings."""
        device = position_ids.device
        if self.kind == "dynamic" and seq_len is not None and seq_len > self.max_position_embeddings:
            factor = self.scaling["factor"]
            ratio = factor * seq_len / self.max_position_embeddings - (factor - 1)
            base = self.base * ratio ** (self.dim / (self.dim - 2))
            cos, sin = self._table(seq_len, device, base)
        else:
            key = (device.type, device.index)
            if key not in self._tables:
                self._tables[key] = self._table(self.max_position_embeddings, device)
            cos, sin = self._tables[key]
        return cos[position_ids].to(dtype), sin[position_ids].to(dtype)


def rope_for(config) -> RotaryEmbedding:
    """The one rotary table of a decoder: over qk_rope_head_dim for MLA, the whole head for MHA."""
    dim = config.qk_rope_head_dim if config.use_mla else config.hidden_size // config.num_attention_heads
    return RotaryEmbedding(dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(beta_fast, beta_slow, dim, base, original_max_positions):
    def dim_for(rotations):
        return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(dim_for(beta_fast))
    high = math.ceil(dim_for(beta_slow))
    return max(low, 0), min(high, dim - 1)
