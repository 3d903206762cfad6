"""The fused MoE router kernel: float32 logits (by gemv for few tokens), then per token softmax or
sigmoid, optional correction bias for the choice, top-k by repeated argmax, renormalisation and
scaling (topk_method greedy, or the n_group == 1 forms of the others); the always-on shared
experts are appended with weight 1. Used at prefill and decode (dispatch.route); inside compiled
regions it is the torch custom op deepseek_vl2::route.
"""
from typing import Optional

import torch

from . import gemv
from .custom_ops import kernel_op, launch_options, tl, triton

MAX_ROUTER_GEMV_TOKENS = 64  # router logits by gemv up to this many tokens, by a float32 GEMM beyond


if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, n_experts, scale, TOP_K: tl.constexpr,
                      ALWAYS_ON: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        t = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        e_mask = offs_e < n_experts
        logits = tl.load(logits_ptr + t * n_experts + offs_e, mask=e_mask, other=float("-inf"))
        if SIGMOID:
            scores = tl.sigmoid(logits)
        else:
            exp = tl.exp(logits - tl.max(logits, axis=0))
            scores = exp / tl.sum(exp, axis=0)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
        choice = tl.where(e_mask, choice, float("-inf"))
        denominator = 1.0
        if NORMALIZE:
            remaining = choice
            total = 0.0
            for _ in tl.static_range(TOP_K):
                best = tl.argmax(remaining, axis=0)
                total += tl.sum(tl.where(offs_e == best, scores, 0.0), axis=0)
                remaining = tl.where(offs_e == best, float("-inf"), remaining)
            denominator = total + 1e-20
        row = t * (TOP_K + ALWAYS_ON)
        for i in tl.static_range(TOP_K):
            best = tl.argmax(choice, axis=0)
            weight = tl.sum(tl.where(offs_e == best, scores, 0.0), axis=0)
            tl.store(ids_ptr + row + i, best.to(tl.int64))
            tl.store(weights_ptr + row + i, weight / denominator * scale)
            choice = tl.where(offs_e == best, float("-inf"), choice)
        for i in tl.static_range(ALWAYS_ON):
            tl.store(ids_ptr + row + TOP_K + i, (n_experts + i).to(tl.int64))
            tl.store(weights_ptr + row + TOP_K + i, 1.0)

    def _route_fake(x, weight, bias, top_k, sigmoid, normalize, scale, always_on=0):
        return (torch.empty(x.shape[0], top_k + always_on, device=x.device, dtype=torch.long),
                torch.empty(x.shape[0], top_k + always_on, device=x.device, dtype=torch.float32))

    @kernel_op("route", _route_fake)
    def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, sigmoid: bool,
              normalize: bool, scale: float, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        T, E = x.shape[0], weight.shape[0]
        if T <= MAX_ROUTER_GEMV_TOKENS:
            logits = gemv._gemv_launch(x.contiguous(), weight, None, 1, False, out_dtype=torch.float32)
        else:
            logits = torch.nn.functional.linear(x.float(), weight.float())
        ids = torch.empty(T, top_k + always_on, device=x.device, dtype=torch.long)
        weights = torch.empty(T, top_k + always_on, device=x.device, dtype=torch.float32)
        _route_kernel[(T,)](logits, bias if bias is not None else logits, ids, weights, E, scale, TOP_K=top_k,
                            ALWAYS_ON=always_on, SIGMOID=sigmoid, HAS_BIAS=bias is not None, NORMALIZE=normalize,
                            BLOCK_E=triton.next_power_of_2(E), num_warps=1, **launch_options(ids))
        return ids, weights

