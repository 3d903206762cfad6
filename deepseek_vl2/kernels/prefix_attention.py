"""Prefix attention: the queries of one prompt chunk over its cache row, where key j is visible to
query i exactly when j <= positions[i] (the continuous engine's prompt chunk inside a decode step).

The visibility comes from the positions, not from an additive mask: each program takes a tile of
queries of one head and reads keys only up to the last one its tile can see, so an early chunk
skips the unwritten end of the row. Scores and the softmax are float32 (an online softmax over
key tiles); probabilities enter the value product in the activation dtype.

One kernel serves both attentions: plain multi-head (tiny: keys and values from the cache) and
MLA with its latents expanded to per-head keys and values, whose rope key is shared by all heads
(`k_pe`, added to the scores as a second product). Strided views need no copies. When it applies
is decided in dispatch.py.
"""
from typing import Optional

import torch

from ..modeling.devices import on_tensor_device
from .custom_ops import tl, triton

if triton is not None:

    @triton.jit
    def _prefix_attention_kernel(q_ptr, k_ptr, v_ptr, qpe_ptr, kpe_ptr, pos_ptr, out_ptr, S, kv_len, scale,
                                 stride_qs, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                                 stride_ps, stride_ph, stride_pn, stride_os, stride_oh,
                                 GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DPE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        in_chunk = offs_m < S
        positions = tl.load(pos_ptr + offs_m, mask=in_chunk, other=-1)
        offs_d = tl.arange(0, D)
        offs_v = tl.arange(0, DV)
        q = tl.load(q_ptr + offs_m[:, None] * stride_qs + h * stride_qh + offs_d[None, :], mask=in_chunk[:, None],
                    other=0.0)
        if DPE > 0:
            offs_p = tl.arange(0, DPE)
            q_pe = tl.load(qpe_ptr + offs_m[:, None] * stride_ps + h * stride_ph + offs_p[None, :],
                           mask=in_chunk[:, None], other=0.0)
        keys = k_ptr + (h // GROUP) * stride_kh
        values = v_ptr + (h // GROUP) * stride_vh
        running_max = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)  # finite: rows past the chunk see no key
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
        end = tl.minimum(tl.max(positions, axis=0) + 1, kv_len)  # the last key this tile sees, + 1
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_row = offs_n < kv_len
            k = tl.load(keys + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_row[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k))
            if DPE > 0:
                k_pe = tl.load(kpe_ptr + offs_n[:, None] * stride_pn + offs_p[None, :], mask=in_row[:, None],
                               other=0.0)
                scores += tl.dot(q_pe, tl.trans(k_pe))
            visible = (offs_n[None, :] <= positions[:, None]) & in_row[None, :]
            scores = tl.where(visible, scores * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            probs = tl.exp(scores - new_max[:, None])
            alpha = tl.exp(running_max - new_max)
            running_sum = running_sum * alpha + tl.sum(probs, axis=1)
            v = tl.load(values + offs_n[:, None] * stride_vn + offs_v[None, :], mask=in_row[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            running_max = new_max
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + offs_m[:, None] * stride_os + h * stride_oh + offs_v[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_chunk[:, None])


@on_tensor_device
def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
                     q_pe: Optional[torch.Tensor] = None, k_pe: Optional[torch.Tensor] = None,
                     block_m: int = 32, block_n: int = 128, num_warps: int = 4) -> torch.Tensor:
    """q [S, H, D] over k [kv_len, kv_heads, D] and v [kv_len, kv_heads, DV] (strided views; the
    last dimension contiguous), key j visible to query i when j <= positions[i] ([S], a device
    tensor) -> [S, H, DV] = softmax(scale * q.k) . v. With q_pe [S, H, DPE] and k_pe [kv_len, DPE]
    (one rope key for all heads, MLA) the scores are scale * (q.k + q_pe.k_pe). Every query must
    see key 0 (positions >= 0). The default tiles measured best at tiny's and small's shapes on an
    H200 (benchmarks/prefix_attention_configs.py: 22.8 us against SDPA's 109 us with the mask at
    tiny's, 28.6 us + 17.6 us of expansion against 116 us at small's)."""
    S, H, D = q.shape
    kv_len, kv_heads, DV = v.shape
    for name, t in (("q", q), ("k", k), ("v", v), ("q_pe", q_pe), ("k_pe", k_pe)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"prefix_attention needs the last dimension of {name} contiguous")
    with_pe = q_pe is not None
    pe_q, pe_k = (q_pe, k_pe) if with_pe else (q, k[:, 0])  # placeholders the kernel does not read
    out = q.new_empty(S, H, DV)
    grid = (triton.cdiv(S, block_m), H)
    _prefix_attention_kernel[grid](
        q, k, v, pe_q, pe_k, positions, out, S, kv_len, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), pe_q.stride(0), pe_q.stride(1) if with_pe else 0, pe_k.stride(0),
        out.stride(0), out.stride(1), GROUP=H // kv_heads, D=D, DV=DV, DPE=q_pe.shape[-1] if with_pe else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out
