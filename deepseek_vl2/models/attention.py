"""Self-attention of the decoder: plain multi-head attention (tiny, `use_mla: false`) and
multi-head latent attention (small and base). Spec: language_model.md §4-§6.

Each is split in three: `project` (norm output -> queries and the new tokens' cache entries, with
RoPE applied; fixed shapes), `store` (write the entries into this layer's cache tensor at absolute
positions; the GPU decode path compiles these two together) and `attend` (store unless already
stored, then attend over `kv_len` keys). `o_proj` is applied by the decoder layer. With a prepared
`AttentionInputs` the same code serves prefill, chunked prefill and fixed-shape (CUDA-graph)
decode steps.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deepseek import DeepseekV2Config
from .rms_norm import RMSNorm
from . import triton_decode
from .rope import apply_rotary, rope_for


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
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return AttentionInputs(cache_positions, kv_len, mask.unsqueeze(1))


def causal_mask(seq_len: int, dtype, device) -> torch.Tensor:
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)


class MultiHeadAttention(nn.Module):
    """Llama-style attention with rotate-half RoPE over the whole head (the tiny release).
    Cache entries: keys (after RoPE) and values stacked, [B, 2, kv_heads, S, head_dim]."""

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
        """Official name -> (parameter, index) for the fused q/k/v projection."""
        keys, start = {}, 0
        for name, size in zip(("q_proj", "k_proj", "v_proj"), self.split_sizes):
            rows = slice(start, start + size)
            keys[f"{name}.weight"] = ("qkv_proj.weight", (rows,))
            if self.qkv_proj.bias is not None:
                keys[f"{name}.bias"] = ("qkv_proj.bias", (rows,))
            start += size
        return keys

    def project(self, x, cos, sin):
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), torch.stack((apply_rotary(k, cos, sin), v), dim=1)

    @staticmethod
    def store(kv: torch.Tensor, keys_values: torch.Tensor, cache_positions: torch.Tensor) -> None:
        kv[:, :, :, cache_positions] = keys_values.to(kv.dtype)

    def attend(self, q, keys_values, attn: AttentionInputs, kv: Optional[torch.Tensor]):
        """`keys_values` [B, 2, kv_heads, S, head_dim] of the new tokens (None: already stored in
        `kv`); `kv` this layer's cache."""
        B, _, S, _ = q.shape
        if kv is not None:
            if keys_values is not None:
                self.store(kv, keys_values, attn.cache_positions)
            keys_values = kv[:, :, :, : attn.kv_len]
        if attn.mask is not None and triton_decode.mha_decode_applies(q):
            out = triton_decode.mha_decode(q[:, :, 0], keys_values, attn.mask[:, 0, 0], self.head_dim**-0.5)
            return out.view(B, 1, -1)
        k, v = keys_values[:, 0], keys_values[:, 1]
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.mask is None and S > 1)
        return out.transpose(1, 2).reshape(B, S, -1)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA. Keys and values are cached as one low-rank latent per token: c_kv after
    kv_a_layernorm followed by the rope key shared by all heads, [B, S, kv_lora_rank + rope_dim].

    Decode (and any CPU call) attends in the absorbed form: queries are mapped into the latent
    space through the key half of kv_b_proj, scores are taken against the cached latents directly,
    and the value half of kv_b_proj is applied after the softmax. Multi-token CUDA calls (prefill)
    expand the latents to per-head keys and values and use SDPA, which is cheaper for long inputs.
    """

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        q_out = self.num_heads * (self.nope_dim + self.rope_dim)
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)  # default eps, as the reference (P-LM-5)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.kv_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = (self.nope_dim + self.rope_dim) ** -0.5 * rope_for(c).attention_scale

    def project(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split((self.nope_dim, self.rope_dim), dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.rope_dim), dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin, interleaved=True)
        k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)
        return (q_nope, q_pe), torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1)

    @staticmethod
    def store(kv: torch.Tensor, latent: torch.Tensor, cache_positions: torch.Tensor) -> None:
        kv[:, cache_positions] = latent.to(kv.dtype)

    def attend(self, q, latent, attn: AttentionInputs, kv: Optional[torch.Tensor]):
        """`latent` [B, S, rank + rope] of the new tokens (None: already stored in `kv`); `kv` this
        layer's cache."""
        q_nope, q_pe = q
        if kv is not None:
            if latent is not None:
                self.store(kv, latent, attn.cache_positions)
            latent = kv[:, : attn.kv_len]
        if q_nope.is_cuda and q_nope.shape[2] > 1:
            out = self._attend_expanded(q_nope, q_pe, latent, attn)
        else:
            out = self._attend_absorbed(q_nope, q_pe, latent, attn)
        B, H, S, _ = out.shape
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)

    def _kv_b_halves(self):
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, nope, rank], W_UV [H, v, rank]

    def _attend_absorbed(self, q_nope, q_pe, latent, attn: AttentionInputs):
        B, H, S, _ = q_nope.shape
        w_uk, w_uv = self._kv_b_halves()
        q_absorbed = per_head_matmul(q_nope, w_uk)  # [B, H, S, rank]
        if attn.mask is not None and triton_decode.mla_decode_applies(q_nope, self.kv_rank, self.rope_dim):
            out_latent = triton_decode.mla_decode(q_absorbed[:, :, 0], q_pe[:, :, 0], latent, attn.mask[:, 0, 0],
                                                  self.softmax_scale)
            return per_head_matmul(out_latent[:, :, None], w_uv.transpose(1, 2))
        q_latent = torch.cat((q_absorbed, q_pe), dim=-1)  # [B, H, S, rank + rope]
        scores = torch.bmm(q_latent.reshape(B, H * S, -1), latent.transpose(1, 2)).view(B, H, S, -1)
        scores = scores * self.softmax_scale
        mask = attn.mask if attn.mask is not None else causal_mask(S, scores.dtype, scores.device)
        probs = torch.softmax((scores + mask).float(), dim=-1).to(q_nope.dtype)
        out_latent = torch.bmm(probs.view(B, H * S, -1), latent[..., : self.kv_rank]).view(B, H, S, -1)
        return per_head_matmul(out_latent, w_uv.transpose(1, 2))  # [B, H, S, v]

    def _attend_expanded(self, q_nope, q_pe, latent, attn: AttentionInputs):
        B, H, S, _ = q_nope.shape
        kv_len = latent.shape[1]
        kv = self.kv_b_proj(latent[..., : self.kv_rank]).view(B, kv_len, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split((self.nope_dim, self.v_dim), dim=-1)
        k_pe = latent[:, None, :, self.kv_rank :].expand(B, H, kv_len, self.rope_dim)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn.mask, is_causal=attn.mask is None, scale=self.softmax_scale
        )


def per_head_matmul(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] @ weights [H, d, e] -> [B, H, S, e], as one batched product over heads
    (torch.matmul would first copy the weights once per batch row)."""
    B, H, S, d = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(H, B * S, d), weights)
    return out.view(H, B, S, -1).transpose(0, 1)


def make_attention(config: DeepseekV2Config) -> nn.Module:
    return MultiHeadLatentAttention(config) if config.use_mla else MultiHeadAttention(config)
