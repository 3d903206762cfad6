"""Self-attention of the decoder: plain multi-head attention (tiny, `use_mla: false`) and
multi-head latent attention (small and base).

Each is split in two: `project` (norm output -> queries and the new tokens' cache entries, with
RoPE applied; fixed shapes; `project_into` writes the entries into a layer's cache instead of
returning them) and `attend` (queries over the entries the KV cache returns for `kv_len` keys, or
over the new entries alone without a cache). Where the entries are kept is the
KV cache's business (kv_cache.py); which kernel attends is dispatch.py's. `o_proj` is applied by
the decoder layer. With a prepared `AttentionInputs` the same code serves prefill, chunked
prefill and fixed-shape (CUDA-graph) decode steps.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch
from ..weights.layout import stacked_rows
from .kv_cache import LayerCache
from .language_config import DeepseekV2Config
from .rms_norm import RMSNorm
from .rope import rope_for


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares."""

    cache_positions: torch.Tensor  # [S] cache slots of the new tokens
    kv_len: int  # key positions attended to: cached + new (a fixed bucket in graph decode)
    mask: Optional[torch.Tensor]  # additive [B, 1, S, kv_len]; None means plain causal with kv_len == S


def build_attention_inputs(
    attention_mask: Optional[torch.Tensor],
    past_length: int,
    seq_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device,
    cache_positions: Optional[torch.Tensor] = None,
) -> AttentionInputs:
    """Key j is visible to query i when j <= i's cache slot and `attention_mask[b, j]` is set.

    `attention_mask` is the 2-D padding mask over cached + new tokens ([B, >= past_length+seq_len],
    1/True = real token) or None. `cache_positions` (default: past_length onwards) may be a device
    tensor, as in CUDA-graph decode steps; with one new token nothing here reads device values.
    Masked entries get finfo(dtype).min (a fully masked row, a padding query, then attends
    uniformly, as in the reference, instead of producing NaN).
    """
    if cache_positions is None:
        cache_positions = torch.arange(past_length, past_length + seq_len, device=device)
    no_padding = attention_mask is None or (seq_len > 1 and bool(attention_mask.bool().all()))
    if no_padding and past_length == 0 and kv_len == seq_len:
        return AttentionInputs(cache_positions, kv_len, None)
    keys = torch.arange(kv_len, device=device)
    visible = keys[None, :] <= cache_positions[:, None]  # [S, kv_len]
    if attention_mask is not None:
        padding = attention_mask[:, :kv_len].to(device=device, dtype=torch.bool)
        if padding.shape[1] < kv_len:  # slots past the mask are unwritten: hidden by causality anyway
            padding = F.pad(padding, (0, kv_len - padding.shape[1]), value=False)
        visible = visible[None] & padding[:, None, :]
    else:
        visible = visible[None]
    return AttentionInputs(cache_positions, kv_len, additive_mask(visible, dtype).unsqueeze(1))


def row_attention_inputs(visible: torch.Tensor, slots: torch.Tensor, kv_len: int, dtype: torch.dtype) -> AttentionInputs:
    """A one-token decode step whose rows write to slots of their own (`slots` [B, 1], a device
    tensor): key j is visible to row b when j <= slots[b] and `visible[b, j]` is set ([B, >= kv_len]).
    Fixed shapes, no host read."""
    keys = torch.arange(kv_len, device=slots.device)
    seen = visible[:, :kv_len].to(torch.bool) & (keys[None, :] <= slots)  # [B, kv_len]
    return AttentionInputs(slots, kv_len, additive_mask(seen, dtype)[:, None, None, :])


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible` (bool) is set, finfo(dtype).min elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


class MultiHeadAttention(nn.Module):
    """Llama-style attention with rotate-half RoPE over the whole head (the tiny release).
    Entries per token: keys (after RoPE) and values stacked, [B, 2, kv_heads, S, head_dim]."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    def checkpoint_keys(self):
        """Official names of the fused q/k/v projection's rows."""
        return stacked_rows("qkv_proj", zip(("q_proj", "k_proj", "v_proj"), self.split_sizes),
                            bias=self.qkv_proj.bias is not None)

    def project(self, x, cos, sin):
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = dispatch.rotary(q, cos, sin), dispatch.rotary(k, cos, sin)
        return q, torch.stack((k, v), dim=1)

    def project_into(self, x, cos, sin, kv: LayerCache, positions):
        """`project`, the new tokens' entries written into `kv` at `positions`; returns the queries."""
        query, entries = self.project(x, cos, sin)
        kv.write(positions, entries)
        return query

    def attend(self, q, keys_values, attn: AttentionInputs):
        """q [B, H, S, head_dim] over `keys_values` [B, 2, kv_heads, kv_len, head_dim] -> [B, S, H * head_dim]."""
        return dispatch.mha_attention(q, keys_values, attn.mask)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA. Keys and values are entered as one low-rank latent per token: c_kv after
    kv_a_layernorm followed by the rope key shared by all heads, [B, S, kv_lora_rank + rope_dim].
    The two projections of the layer's input, the query's (q_proj, or q_a_proj with a query rank)
    and the latent's (kv_a_proj_with_mqa), are one linear layer, `q_kv_a_proj`: one product
    instead of two for every token (a decode step launches one kernel fewer per layer).
    `dispatch.mla_attention` attends in the absorbed form (decode, any CPU call) or, for multi-token
    CUDA calls, with the latents expanded to per-head keys and values."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        q_out = self.num_heads * (self.nope_dim + self.rope_dim)
        self.q_rank = c.q_lora_rank  # None: the query comes straight from q_proj
        if self.q_rank is None and c.attention_bias:
            raise ValueError("use_mla with attention_bias needs q_lora_rank: the official q_proj has no bias while "
                             "kv_a_proj_with_mqa has one, and this model fuses the two (no DeepSeek-VL2 release sets "
                             "attention_bias)")
        self.split_sizes = (q_out if self.q_rank is None else self.q_rank, self.kv_rank, self.rope_dim)
        self.q_kv_a_proj = nn.Linear(c.hidden_size, sum(self.split_sizes), bias=c.attention_bias)
        if self.q_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_rank)  # default eps, as the official model
            self.q_b_proj = nn.Linear(self.q_rank, q_out, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = (self.nope_dim + self.rope_dim) ** -0.5 * rope_for(c).attention_scale

    def checkpoint_keys(self):
        """Official names of the fused input projection's rows."""
        q_name = "q_proj" if self.q_rank is None else "q_a_proj"
        return stacked_rows("q_kv_a_proj", [(q_name, self.split_sizes[0]),
                                            ("kv_a_proj_with_mqa", sum(self.split_sizes[1:]))],
                            bias=self.q_kv_a_proj.bias is not None)

    def _projections(self, x):
        """The query's parts without and with rope [B, H, S, *], the latent c_kv [B, S, rank] and the
        rope key k_pe [B, S, rope] of x (views of the projections, before the norm and RoPE)."""
        B, S, _ = x.shape
        q, c_kv, k_pe = self.q_kv_a_proj(x).split(self.split_sizes, dim=-1)
        if self.q_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, S, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split((self.nope_dim, self.rope_dim), dim=-1)
        return q_nope, q_pe, c_kv, k_pe

    def project(self, x, cos, sin):
        """The query (q_nope, q_pe, None) and the new tokens' entries."""
        q_nope, q_pe, c_kv, k_pe = self._projections(x)
        q_pe = dispatch.rotary(q_pe, cos, sin, interleaved=True)
        k_pe = dispatch.rotary(k_pe.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)
        return (q_nope, q_pe, None), torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1)

    def project_into(self, x, cos, sin, kv: LayerCache, positions):
        """`project`, the new tokens' entries written into `kv` at `positions` (RoPE, the latent's norm
        and the write in one kernel where dispatch has it); returns the query (q_nope, q_pe, q_nope
        absorbed through W_UK where that kernel did it too, else None)."""
        q_nope, q_pe, c_kv, k_pe = self._projections(x)
        norm = self.kv_a_layernorm
        q_pe, q_absorbed = dispatch.mla_new_tokens(q_nope, q_pe, c_kv, k_pe, cos, sin, norm.weight, norm.eps, kv,
                                                   positions, self.kv_b_proj.weight)
        return q_nope, q_pe, q_absorbed

    def attend(self, q, latent, attn: AttentionInputs):
        """(q_nope, q_pe, q_absorbed or None) [B, H, S, *] over `latent` [B, kv_len, rank + rope] ->
        [B, S, H * v_dim]."""
        q_nope, q_pe, q_absorbed = q
        out = dispatch.mla_attention(q_nope, q_pe, latent, attn.mask, self.kv_b_proj.weight, self.softmax_scale,
                                     q_absorbed)
        B, H, S, _ = out.shape
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)


def make_attention(config: DeepseekV2Config) -> nn.Module:
    return MultiHeadLatentAttention(config) if config.use_mla else MultiHeadAttention(config)
