"""The MoE router's choice on CUDA, from its float32 logits: per token softmax or sigmoid, optional
correction bias for the choice, top-k by repeated argmax, renormalisation and scaling (topk_method
greedy, or the n_group == 1 forms of the others); the always-on shared experts follow the top k
with weight 1.

  routed_expert  one (token, slot) pair's expert, computed where it is needed: by the route kernel
                 below, and by the quantized expert gate/up gemv at decode rows (quant_gemv.py),
                 whose programs each pick their own expert from the logits, so that no kernel runs
                 between the router's logits and the experts;
  route          every pair's expert id and weight, one program a pair (prefill, and decode rows
                 past the gemv's); inside compiled regions the torch custom op deepseek_vl2::route;
  add_norm_logits
                 the router's input and its logits at decode rows: the residual sum x + delta, its
                 RMSNorm and the norm times the router's weight (float32), in one kernel where
                 torch.compile made two (the sum and norm; the logits' gemv), the custom op
                 deepseek_vl2::add_norm_logits; add_norm_logits_pairs also writes the norm as
                 x pairs for the int4 experts' gate/up gemv (x_pairs.py).

dispatch.route and dispatch.moe decide where each runs and compute the logits.
"""
from typing import NamedTuple, Optional

import torch

from .custom_ops import kernel_op, launch_options, tl, triton

# add_norm_logits' experts a program and warps: the best measured alone at one row on an H200 for
# small's, base's and tiny's (hidden, experts) (benchmarks/RESULTS.md, forty-third session: 2.00 / 2.18
# / 1.89 us against 2.35 / 2.71 / 2.27 at 8 experts a program)
NORM_LOGITS_EXPERTS, NORM_LOGITS_WARPS = 2, 4

if triton is not None:
    from .custom_ops import await_earlier_kernels
    from .norm_rope import rms_normed
    from .x_pairs import empty_pairs, pairs_row, store_pairs

    @triton.jit
    def routed_expert(logits_ptr, bias_ptr, ids_ptr, weights_ptr, pair, pairs_per_token, n_experts, scale, store,
                      TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr):
        """The expert of pair `pair` = token * pairs_per_token + slot (int32): for slot < TOP_K the
        slot-th choice among the token's n_experts float32 logits, else the always-on expert
        n_experts + slot - TOP_K. With `store`, the pair's id (int64) and weight (float32: its score,
        over the sum of the top k's scores where NORMALIZE, times `scale`; 1 for the always-on) are
        written at `pair` of ids / weights. Ties go to the lower expert id.

        A pair that only needs its expert takes the choices up to its slot (none for the always-on),
        one (max, index) reduction each; its score is the chosen value, or with a correction bias
        the score recomputed from the chosen logit, by the same operations as the vector's."""
        t = pair // pairs_per_token
        slot = pair % pairs_per_token
        offs_e = tl.arange(0, BLOCK_E)
        e_mask = offs_e < n_experts
        row = logits_ptr + t * n_experts
        logits = tl.load(row + offs_e, mask=e_mask, other=float("-inf"))
        if SIGMOID:
            scores = tl.sigmoid(logits)
        else:
            top = tl.max(logits, axis=0)
            exp_sum = tl.sum(tl.exp(logits - top), axis=0)
            scores = tl.exp(logits - top) / exp_sum
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
        choice = tl.where(e_mask, choice, float("-inf"))
        expert = n_experts + slot - TOP_K
        picked = tl.full([], 1.0, tl.float32)
        total = tl.full([], 0.0, tl.float32)
        rounds = tl.where(store, TOP_K, tl.where(slot < TOP_K, slot + 1, 0))
        for i in range(rounds):
            value, best = tl.max(choice, axis=0, return_indices=True)
            score = value
            if HAS_BIAS:
                logit = tl.load(row + best)
                if SIGMOID:
                    score = tl.sigmoid(logit)
                else:
                    score = tl.exp(logit - top) / exp_sum
            total += score
            expert = tl.where(i == slot, best, expert)
            picked = tl.where(i == slot, score, picked)
            choice = tl.where(offs_e == best, float("-inf"), choice)
        if store:
            denominator = 1.0
            if NORMALIZE:
                denominator = total + 1e-20
            tl.store(ids_ptr + pair, expert.to(tl.int64))
            tl.store(weights_ptr + pair, tl.where(slot < TOP_K, picked / denominator * scale, 1.0))
        return expert

    @triton.jit
    def _route_kernel(ids_ptr, pairs_per_token, logits_ptr, bias_ptr, weights_ptr, n_experts, route_scale,
                      TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        routed_expert(logits_ptr, bias_ptr, ids_ptr, weights_ptr, tl.program_id(0), pairs_per_token, n_experts,
                      route_scale, True, TOP_K, SIGMOID, HAS_BIAS, NORMALIZE, BLOCK_E)

    @triton.jit
    def _add_norm_logits_kernel(x_ptr, delta_ptr, norm_w_ptr, router_w_ptr, sum_ptr, normed_ptr, logits_ptr, pairs_ptr,
                                width, n_experts, stride_x, stride_delta, eps, BLOCK: tl.constexpr,
                                BLOCK_E: tl.constexpr, PAIRS_CHAIN: tl.constexpr, PTX: tl.constexpr,
                                PDL: tl.constexpr):
        """Program (row, j): the row's sum and norm (stored by j == 0; with PAIRS_CHAIN the norm also as
        x pairs for an int4 gemv of chains of that many words) and its logits for experts
        [j * BLOCK_E, +BLOCK_E). Every load is issued before the norm's reduction."""
        await_earlier_kernels(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < width
        experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = experts < n_experts
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + row * stride_delta + offs, mask=valid, other=0.0)
        w_router = tl.load(router_w_ptr + experts[:, None] * width + offs[None, :],
                           mask=e_mask[:, None] & valid[None, :], other=0.0)
        w_norm = tl.load(norm_w_ptr + offs, mask=valid, other=0.0)
        total = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)  # rounded as the activations' add
        normed = rms_normed(total, w_norm, width, eps).to(x.dtype)
        logits = tl.sum(w_router.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1)
        tl.store(logits_ptr + row * n_experts + experts, logits, mask=e_mask)
        if tl.program_id(1) == 0:
            tl.store(sum_ptr + row * width + offs, total, mask=valid)
            tl.store(normed_ptr + row * width + offs, normed, mask=valid)
            if PAIRS_CHAIN > 0:
                store_pairs(pairs_row(pairs_ptr, row, width // 8), 0, width // 8, normed.to(tl.float32), BLOCK // 8,
                            PAIRS_CHAIN, PTX)

    def _add_norm_logits_fake(x, delta, norm_weight, eps, router_weight):
        return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[0], router_weight.shape[0],
                                                                        dtype=torch.float32)

    @kernel_op("add_norm_logits", _add_norm_logits_fake)
    def add_norm_logits(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, delta [T, h] (rows of h contiguous), RMSNorm weight [h], router weight [E, h] (contiguous,
        all in one dtype) -> (x + delta, rms_norm(x + delta) (norm_rope.rms_norm's rounding), its
        float32 logits [T, E])."""
        return _add_norm_logits_launch(x, delta, norm_weight, eps, router_weight, 0)[:3]

    def _add_norm_logits_pairs_fake(x, delta, norm_weight, eps, router_weight, pairs_chain):
        return (*_add_norm_logits_fake(x, delta, norm_weight, eps, router_weight),
                empty_pairs(x.shape[0], x.shape[1], x.device))

    @kernel_op("add_norm_logits_pairs", _add_norm_logits_pairs_fake)
    def add_norm_logits_pairs(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              router_weight: torch.Tensor,
                              pairs_chain: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """add_norm_logits, and the norm also as x pairs (x_pairs.py, int32 [T, 5, h / 8]) for an int4
        gemv whose tiles chain `pairs_chain` words (h a multiple of 8)."""
        return _add_norm_logits_launch(x, delta, norm_weight, eps, router_weight, pairs_chain)

    def _add_norm_logits_launch(x, delta, norm_weight, eps, router_weight, pairs_chain):
        T, h = x.shape
        E = router_weight.shape[0]
        total, normed = x.new_empty(T, h), x.new_empty(T, h)  # contiguous, as the kernel stores them
        logits = x.new_empty(T, E, dtype=torch.float32)
        pairs = empty_pairs(T, h, x.device) if pairs_chain else logits
        if T:
            _add_norm_logits_kernel[(T, triton.cdiv(E, NORM_LOGITS_EXPERTS))](
                x, delta, norm_weight, router_weight, total, normed, logits, pairs, h, E, x.stride(0), delta.stride(0),
                eps, BLOCK=triton.next_power_of_2(h), BLOCK_E=NORM_LOGITS_EXPERTS, PAIRS_CHAIN=pairs_chain,
                PTX=x.is_cuda, num_warps=NORM_LOGITS_WARPS, **launch_options(x))
        return total, normed, logits, pairs

    def route_outputs(tokens: int, pairs_per_token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty expert ids [tokens, pairs_per_token] (int64) and weights (float32)."""
        return (torch.empty(tokens, pairs_per_token, device=device, dtype=torch.long),
                torch.empty(tokens, pairs_per_token, device=device, dtype=torch.float32))

    class PairRouting(NamedTuple):
        """What a kernel needs to pick the pairs' experts (routed_expert): the router's float32 logits
        [T, E] (contiguous), the correction bias [E] or None, the k of the top k, sigmoid (else
        softmax) scores, renormalisation, the weights' scale, and the pairs' weights [T, pairs]
        (float32) to write."""
        logits: torch.Tensor
        bias: Optional[torch.Tensor]
        top_k: int
        sigmoid: bool
        normalize: bool
        scale: float
        weights: torch.Tensor

    def kernel_arguments(routing: Optional[PairRouting], stand_in: torch.Tensor) -> dict:
        """The routing arguments of a kernel calling routed_expert (by name: logits_ptr ... BLOCK_E);
        without `routing` TOP_K = 0, and `stand_in` for every pointer."""
        if routing is None:
            return dict(logits_ptr=stand_in, bias_ptr=stand_in, weights_ptr=stand_in, n_experts=0, route_scale=1.0,
                        TOP_K=0, SIGMOID=False, HAS_BIAS=False, NORMALIZE=False, BLOCK_E=1)
        logits, bias = routing.logits, routing.bias
        return dict(logits_ptr=logits, bias_ptr=bias if bias is not None else logits, weights_ptr=routing.weights,
                    n_experts=logits.shape[1], route_scale=routing.scale, TOP_K=routing.top_k,
                    SIGMOID=routing.sigmoid, HAS_BIAS=bias is not None, NORMALIZE=routing.normalize,
                    BLOCK_E=triton.next_power_of_2(logits.shape[1]))

    def _route_fake(logits, bias, top_k, sigmoid, normalize, scale, always_on=0):
        return route_outputs(logits.shape[0], top_k + always_on, logits.device)

    @kernel_op("route", _route_fake)
    def route(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, sigmoid: bool, normalize: bool,
              scale: float, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] float32 -> expert ids [T, top_k + always_on] (int64) and weights (float32)."""
        ids, weights = route_outputs(logits.shape[0], top_k + always_on, logits.device)
        routing = PairRouting(logits.contiguous(), bias, top_k, sigmoid, normalize, scale, weights)
        if ids.numel():
            _route_kernel[(ids.numel(),)](ids, top_k + always_on, **kernel_arguments(routing, ids), num_warps=1,
                                          **launch_options(ids))
        return ids, weights
