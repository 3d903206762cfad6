"""The PyTorch reference implementation of every op that has a Triton kernel (and of the attention
forms the kernels stand in for): what runs on the CPU, inside torch.compile where the compiler
fuses it, and what the kernel tests compare against. dispatch.py picks between these and the kernels.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# ---- RMSNorm and RoPE ----------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back to the input dtype, then scale by `weight` in that dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] on the last dim: MLA keeps its rope dims as
    interleaved pairs, and this makes rotate-half rotate each pair (2i, 2i+1)."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate-half RoPE on the last dim of x [B, H, S, D] with cos/sin [B, S, D]; `interleaved`: x
    holds its dims as pairs (2i, 2i+1) (MLA), which are `deinterleave`d first."""
    if interleaved:
        x = deinterleave(x)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# ---- MoE: router, expert activation, combination -------------------------------------------------

@dataclass(frozen=True)
class Routing:
    """How a MoE router picks its experts (from the language config)."""

    top_k: int
    num_experts: int
    method: str  # greedy | group_limited_greedy | noaux_tc
    scoring: str  # softmax | sigmoid
    n_group: Optional[int]
    topk_group: Optional[int]
    normalize: bool
    scale: float


def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], routing: Routing,
          always_on: int = 0):
    """x [N, h] -> expert ids [N, k + always_on] (int64) and weights (float32): the top k (float32
    throughout, unsorted), then the `always_on` experts numbered from num_experts on with weight 1."""
    r = routing
    logits = F.linear(x.float(), weight.float())
    scores = logits.softmax(dim=-1) if r.scoring == "softmax" else logits.sigmoid()
    if r.method == "greedy":
        weights, ids = torch.topk(scores, r.top_k, dim=-1, sorted=False)
    elif r.method == "group_limited_greedy":
        group_scores = scores.view(len(x), r.n_group, -1).amax(dim=-1)
        masked = _keep_top_groups(scores, group_scores, r)
        weights, ids = torch.topk(masked, r.top_k, dim=-1, sorted=False)
    else:  # noaux_tc: select with the bias, weigh without it
        choice = scores + bias.float()
        group_scores = choice.view(len(x), r.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
        masked = _keep_top_groups(choice, group_scores, r)
        ids = torch.topk(masked, r.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
    if r.top_k > 1 and r.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * r.scale
    if always_on:
        N = x.shape[0]
        extra = torch.arange(r.num_experts, r.num_experts + always_on, device=x.device)
        ids = torch.cat((ids, extra.expand(N, -1)), dim=1)
        weights = torch.cat((weights, weights.new_ones(N, always_on)), dim=1)
    return ids, weights


def _keep_top_groups(scores, group_scores, r: Routing):
    """Zero (not -inf, as the reference) the scores of experts outside the best groups."""
    best = torch.topk(group_scores, r.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.repeat_interleave(r.num_experts // r.n_group, dim=1)
    return scores.masked_fill(~keep, 0.0)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] gate and up halves -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs [N*k, h] in (token, slot) order -> per token sum of weight * output, in float32
    (as the reference), returned in the outputs' dtype."""
    N, k = weights.shape
    return (outputs.view(N, k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(outputs.dtype)


# ---- attention over cached entries ---------------------------------------------------------------

def causal_mask(seq_len: int, dtype, device) -> torch.Tensor:
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)


def mha_attention(q: torch.Tensor, keys_values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B, H, S, D] over keys_values [B, 2, kv_heads, kv_len, D] (keys after RoPE, values) with the
    additive `mask` [B, 1, S, kv_len] (None: plain causal) -> [B, S, H * D]."""
    B, H, S, _ = q.shape
    k, v = keys_values[:, 0], keys_values[:, 1]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1)
    return out.transpose(1, 2).reshape(B, S, -1)


def per_head_matmul(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] @ weights [H, d, e] -> [B, H, S, e], as one batched product over heads
    (torch.matmul would first copy the weights once per batch row)."""
    B, H, S, d = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(H, B * S, d), weights)
    return out.view(H, B, S, -1).transpose(0, 1)


def kv_b_halves(kv_b_weight: torch.Tensor, heads: int, nope_dim: int):
    """MLA's kv_b_proj weight [H * (nope + v), rank] as W_UK [H, nope, rank] and W_UV [H, v, rank]."""
    w = kv_b_weight.view(heads, -1, kv_b_weight.shape[-1])
    return w[:, :nope_dim], w[:, nope_dim:]


def latent_attention(q_absorbed: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """MLA scores in the latent space: q_absorbed [B, H, S, rank] and q_pe [B, H, S, rope] against the
    cached latents [B, kv_len, rank + rope] -> softmax(scale * q.k + mask) . c_kv, [B, H, S, rank]."""
    B, H, S, rank = q_absorbed.shape
    q_latent = torch.cat((q_absorbed, q_pe), dim=-1)  # [B, H, S, rank + rope]
    scores = torch.bmm(q_latent.reshape(B, H * S, -1), latent.transpose(1, 2)).view(B, H, S, -1)
    scores = scores * scale
    mask = mask if mask is not None else causal_mask(S, scores.dtype, scores.device)
    probs = torch.softmax((scores + mask).float(), dim=-1).to(q_absorbed.dtype)
    return torch.bmm(probs.view(B, H * S, -1), latent[..., :rank]).view(B, H, S, -1)


def mla_expanded(q_nope, q_pe, latent, mask: Optional[torch.Tensor], kv_b_weight: torch.Tensor, scale: float):
    """MLA with the latents expanded to per-head keys and values through kv_b_proj, then SDPA
    (cheaper than the absorbed form for long multi-token inputs) -> [B, H, S, v]."""
    B, H, S, nope = q_nope.shape
    kv_len, rank = latent.shape[1], kv_b_weight.shape[-1]
    kv = F.linear(latent[..., :rank], kv_b_weight).view(B, kv_len, H, -1)
    k_nope, v = kv.transpose(1, 2).split((nope, kv.shape[-1] - nope), dim=-1)
    k_pe = latent[:, None, :, rank:].expand(B, H, kv_len, q_pe.shape[-1])
    q = torch.cat((q_nope, q_pe), dim=-1)
    k = torch.cat((k_nope, k_pe), dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
