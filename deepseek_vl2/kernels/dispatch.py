"""The one place that decides which implementation of an op runs (a Triton kernel or the PyTorch
reference) for a tensor's device, dtype and shape. Model code calls these ops and never checks
which backend applies.

    op               Triton kernel, when                                  else (reference.py)
    rms_norm         CUDA inference, outside torch.compile                formula
    rotary           the same, and a power-of-two rope dim >= 4           formula
    mla_new_tokens   bf16/fp16 CUDA inference (compiled regions too), a   rotary, rms_norm and the
                     power-of-two rope dim >= 4 and rank >= 16, the       cache write one by one
                     norm weight and the cache in the latent's dtype;     (mla_attention absorbs
                     the query absorbed through W_UK in the same kernel   the query)
                     up to MLA_ABSORB_IN_NEW_TOKENS_ROWS token rows
    silu_mul         CUDA inference                                       formula
    route            bf16/fp16 CUDA inference, one expert group, eval:    float32 top-k
                     float32 logits (gemv up to MAX_ROUTER_GEMV_TOKENS
                     rows), then the route kernel; in `moe`, where
                     quantized experts take the gemv pair, the gate/up
                     gemv routes
    add_norm_logits  where the route kernels route, up to                 x + delta, rms_norm; the
                     MAX_ROUTER_GEMV_TOKENS rows (compiled regions too):  logits made by `route`
                     the MoE input's sum, norm and router logits in one
                     kernel, which for int4 experts on the gemv also
                     writes the norm as their x pairs (x_pairs.py)
    experts          gemv pair for <= MAX_GEMV_TOKENS bf16/fp16 rows      sort by expert + grouped GEMM,
                     on CUDA, moe_decode's expert_gemm pair up to         combine_sorted kernel on CUDA;
                     MOE_DECODE_ROWS, combine_pairs after either          quantized: on the stacks
                     (inside torch.compile the formula, which fuses);     dequantized one at a time
                     quantized experts: the quant_gemv pair for
                     <= QUANT_EXPERT_GEMV_ROWS rows (int4: the down
                     from x pairs the gate/up wrote, where the down's
                     tiles are 128 columns), moe_decode's
                     quant_expert_gemm pair up to QUANT_EXPERT_SCAN_ROWS,
                     else (bf16/fp16 CUDA) quant_grouped_gemm,
                     dequantizing tile by tile, or from
                     QUANT_STACK_DEQUANTIZE_ROWS rows an expert (eager)
                     each stack dequantized whole for the GEMM
    quantized_linear quant_gemv for <= QUANT_LINEAR_GEMV_ROWS bf16/fp16   F.linear on the dequantized
                     CUDA rows, then quant_grouped_gemm's dense tiles     weight (a one-pass kernel on
                     up to QUANT_LINEAR_TILE_ROWS (int4: short rows)      CUDA, PyTorch ops elsewhere)
    lm_head          gemv for LM_HEAD_GEMV_ROWS bf16/fp16 CUDA rows;      F.linear (quantized: on
                     quantized (int8): quant_gemv, then the dense tiles    the dequantized weight)
                     weight tile first, past LM_HEAD_WEIGHT_FIRST_ROWS
                     rows first
    mha_attention    mha_decode: one bf16/fp16 CUDA query token, a mask,  SDPA
                     power-of-two head_dim >= 16
    mla_attention    mla_decode: as above, power-of-two heads, rank and   absorbed latent attention;
                     rope dims >= 16, W_UV applied in its combine up to   CUDA prefill: expanded + SDPA
                     MLA_COMBINE_VALUES_ROWS rows
    sdpa_backends    every SDPA on CUDA (prefill, vision tower): flash,   (CPU: PyTorch's choice)
                     memory-efficient or math attention, never cuDNN's

"CUDA inference": Triton installed, a CUDA tensor, grad mode off (the kernels have no backward).
Every condition is a plain Python test of device, dtype and shape (and, for a prefill's quantized
stacks, whether a CUDA graph is being captured), so the compiled decode regions trace through them
without graph breaks; inside torch.compile the kernels called there are custom
ops (custom_ops.py).
"""
import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..quantization.weight import QuantizedWeight
from . import decode_attention, gemv, moe_decode, moe_glue, norm_rope, quant_gemv, quant_grouped_gemm, reference, router
from .custom_ops import triton
from .reference import Routing

MAX_GEMV_TOKENS = gemv.MAX_GEMV_TOKENS
# Token rows up to which quantized weights are read by quant_gemv, by bits. The gemv reads a weight
# once per row (per (row, expert) pair for the experts), so its time grows with the rows, while the
# other paths read each weight once but cost more at one row. Measured on an H200 (rows come padded
# to 1, 2, 4, 8, 16, ...): one MoE layer of small with random routing (benchmarks/moe_decode_configs.py
# --quantization int4 int8, benchmarks/RESULTS.md 2026-12-02, thirty-first session) the expert gemv
# pair ahead of moe_decode's scanning GEMM up to 4 rows in int4 (86 against 108 us), behind from 8
# (int4 160 / 155, int8 152 / 113); int8 at 4 rows 84 against 71 us, kept on the gemv there as the
# whole step at 4 rows was not measured with the scan (at 16-32 rows the whole step and the layer
# disagree: QUANT_EXPERT_SCAN_ROWS). The dense projections' gemv beats their dequantized weight and
# cuBLAS up to 2 rows in int4 and 4 in int8 (quant_gemv_configs.py).
QUANT_EXPERT_GEMV_ROWS = {4: 4, 8: 4}
QUANT_LINEAR_GEMV_ROWS = {4: 2, 8: 4}
# Token rows up to which (past the gemv's) quantized experts run through moe_decode.quant_expert_gemm:
# each program finds its expert's pairs among the ids itself, so there is no sorting and each chosen
# expert is read once per 16 of its pairs; past it the sorted grouped GEMM (at most MOE_DECODE_ROWS).
# With random routing one layer of small takes less time scanning up to 32 rows (int4 16 rows 209
# against 240 us sorted, 32 rows 257 / 276; int8 145 / 226, 197 / 277); small's whole decode step
# with bench.py's rows sampling apart (benchmarks/decode_batch_paths.py --sampled, two runs) gained
# at 8 rows (int4 +31%, int8 +44-48%) and in int8 at 16 (+5%, +14%), but lost in int4 at 16 (-14%,
# -3%) and in both at 32 (int4 -11 to -20%, int8 -3 to -11%). The limits follow the whole step.
QUANT_EXPERT_SCAN_ROWS = {4: 8, 8: 16}
# Token rows up to which (past the gemv's) a quantized linear layer runs through the grouped GEMM's
# dense tiles (one weight, dequantized tile by tile, weight tile first in 16-row programs) instead of
# its weight dequantized whole into a bf16 copy for cuBLAS (which then reads the copy again); int4
# only where its rows are at most QUANT_LINEAR_TILE_INT4_GROUPS groups long (an int4 tile is one
# group wide, so long rows take many short steps). Measured on an H200 at every linear layer of tiny,
# small and base (benchmarks/quant_gemv_configs.py --only dense-rows, benchmarks/RESULTS.md
# 2026-12-02), the best tiles against the dequantized weight: int8 0.2-0.7x the time at 4 and 16 rows,
# 0.6-0.96x at 64 (tiny's dense down, 27 steps of 256 columns: 1.0x and 1.14x); int4 at 4 and 16
# rows 0.3-0.99x where rows are up to 20 groups long, 1.03-4.4x where longer, 1.0-1.5x at 64 rows.
QUANT_LINEAR_TILE_ROWS = {4: 16, 8: 64}
QUANT_LINEAR_TILE_INT4_GROUPS = 20
# Token rows per expert (the prompt's (token, expert) pairs over the experts in the stack) from which
# an eager prefill dequantizes a quantized expert stack whole into a bfloat16 scratch (one kernel,
# freed after its GEMM) for torch's grouped GEMM, instead of the grouped GEMM that dequantizes tile
# by tile; None: never. The scratch costs a fixed time a layer, the tiles a time per row. Measured on
# an H200 (benchmarks/RESULTS.md, 2026-12-02): one MoE layer (benchmarks/quant_gemv_configs.py --only
# prefill --prefill-tokens ...): int4 whole loses at up to 124 rows an expert (small, base), is 4%
# behind at 166 (base) and 13% ahead at 186 (small), ahead from 220 on both; int8 whole there only
# ahead from 440 rows. The model's 2054-token prefill, both paths alternating in one process
# (benchmarks/stack_dequantize.py): int4 whole 7-19% faster on all three models, int8 whole 11-21%
# faster (tiny 29.0 -> 22.8 ms, small 74.5 -> 61.8, base 92.3 -> 82.0), which set one limit for both
# then. Since the grouped GEMM finds its own blocks (no layout kernels before it; forty-fourth session)
# int8 follows the one-layer measurement: small's 2054-token prefill, GPU kernel time, whole 43.0-43.5 ms against tiles
# 38.8-38.9 (bf16 31.0-31.5), wall 46.1 against 43.7 ms where the host kept up (bf16 36.2); int4
# whole 42.4-42.9 against tiles 43.8-44.1. Never while a CUDA graph is captured: the graph would hold
# the scratch (base: 1.1 GiB) for good.
QUANT_STACK_DEQUANTIZE_ROWS = {4: 192, 8: 440}
MOE_DECODE_ROWS = moe_decode.MAX_ROWS
# Token rows up to which the router's float32 logits are taken by gemv, by a float32 GEMM beyond.
MAX_ROUTER_GEMV_TOKENS = 64
# Decode rows up to which MLA's key slices are combined and multiplied by W_UV in one kernel
# (decode_attention.mla_decode with w_uv) instead of a combine and a batched product after it.
# Measured on an H200 (benchmarks/attention_configs.py --mla-values, 2054 latents, benchmarks/RESULTS.md
# thirty-third session), us for both, the best tiles against the two kernels: 16 heads 1 row 12.0
# against 14.9, 2 rows 14.2 / 15.7, 4 rows 16.2 / 17.3, 8 rows 20.7 / 19.8; 32 heads 1 row 15.2 /
# 18.4, 4 rows 20.8 / 20.7, 8 rows 32.7 / 25.7 (each program reads its head's W_UV slice once a row).
MLA_COMBINE_VALUES_ROWS = 4
# Token rows up to which MLA's query is absorbed through W_UK by the kernel of its new-token work
# (norm_rope.mla_new_tokens_absorbed) rather than by cuBLAS's batched product in mla_attention: one
# launch fewer a layer. A standalone kernel of the same programs beat cuBLAS at one row only (16
# heads 2.8 against 3.4 us, 32 heads 3.3 / 3.9; at 2 rows 3.6 / 3.5, at 4 rows 4.5 / 3.6;
# benchmarks/RESULTS.md, thirty-sixth session).
MLA_ABSORB_IN_NEW_TOKENS_ROWS = 1


@contextlib.contextmanager
def _limits_set(*tables_and_values):
    """Within the block each (table, value) pair's table holds `value` at both widths (4 and 8 bits);
    every table as it was after it."""
    saved = [dict(table) for table, _ in tables_and_values]
    for table, value in tables_and_values:
        table.update({4: value, 8: value})
    try:
        yield
    finally:
        for (table, _), before in zip(tables_and_values, saved):
            table.update(before)


def quant_gemv_rows(experts: int, projections: int):
    """Within the block quant_gemv reads quantized experts up to `experts` token rows and
    projections up to `projections`, at both widths (for benchmarks trying other limits)."""
    return _limits_set((QUANT_EXPERT_GEMV_ROWS, experts), (QUANT_LINEAR_GEMV_ROWS, projections))


def quant_expert_rows(gemv_rows: int, scan_rows: int):
    """Within the block quantized experts take the gemv up to `gemv_rows` token rows and moe_decode's
    quant_expert_gemm past them up to `scan_rows` (0: never), the sorted grouped GEMM past both, at
    both widths (for benchmarks trying other limits)."""
    return _limits_set((QUANT_EXPERT_GEMV_ROWS, gemv_rows), (QUANT_EXPERT_SCAN_ROWS, scan_rows))


def quant_linear_tile_rows(rows: int):
    """Within the block quantized linear layers take the dense tiles up to `rows` token rows (past the
    gemv's), at both widths (0: never; for benchmarks trying other limits)."""
    return _limits_set((QUANT_LINEAR_TILE_ROWS, rows))


def stack_dequantize_rows(rows: Optional[int]):
    """Within the block an eager prefill dequantizes quantized expert stacks whole from `rows` token
    rows an expert on, at both widths (None: never; for benchmarks trying other limits)."""
    return _limits_set((QUANT_STACK_DEQUANTIZE_ROWS, rows))


def _cuda_inference(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and not torch.is_grad_enabled()


def _half_on_cuda(x: torch.Tensor) -> bool:
    return _cuda_inference(x) and x.dtype in (torch.bfloat16, torch.float16)


def _decode_sized(x: torch.Tensor, max_rows: int) -> bool:
    return _half_on_cuda(x) and x.numel() // x.shape[-1] <= max_rows


def _pow2(*dims: int, least: int) -> bool:
    return all(d >= least and d & (d - 1) == 0 for d in dims)


def _eager_cuda(x: torch.Tensor) -> bool:
    """Norm and RoPE kernels: eager CUDA forwards only (inside torch.compile the formulas fuse)."""
    return _cuda_inference(x) and not torch.compiler.is_compiling()


# ---- norms, RoPE ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _eager_cuda(x):  # one kernel instead of eight
        return norm_rope.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    if _eager_cuda(x) and _pow2(x.shape[-1], least=4):
        return norm_rope.rotary(x, cos, sin, interleaved)
    return reference.rotary(x, cos, sin, interleaved)


def mla_new_tokens(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor, eps: float, kv, positions: torch.Tensor,
                   kv_b_weight: torch.Tensor):
    """MLA's new tokens between their projection and attention: q_pe [B, H, S, P] rotated, and each
    token's cache entry, rms_norm(c_kv [B, S, R]) then the rotated k_pe [B, S, P], written into the
    layer cache `kv` (a modeling.kv_cache.LayerCache) at `positions` ([S] or [B, S]); the rope dims
    are interleaved pairs. Returns (rotated q_pe, q_nope [B, H, S, N] absorbed through W_UK, the key
    half of `kv_b_weight`, or None where mla_attention is left to absorb it). One kernel where it
    applies, also inside torch.compile, where the formulas made three kernels a layer; up to
    MLA_ABSORB_IN_NEW_TOKENS_ROWS token rows the same kernel absorbs the query too."""
    cache = kv.storage
    if _half_on_cuda(q_pe) and _pow2(q_pe.shape[-1], least=4) and _pow2(c_kv.shape[-1], least=16) \
            and norm_weight.dtype == c_kv.dtype == cache.dtype and kv.seq_dim == 1 \
            and q_pe.stride(-1) == c_kv.stride(-1) == k_pe.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1:
        B, H, S, N = q_nope.shape
        if B * S <= MLA_ABSORB_IN_NEW_TOKENS_ROWS and _pow2(N, least=16) and q_nope.stride(-1) == 1 \
                and kv_b_weight.dtype == q_nope.dtype and kv_b_weight.stride(-1) == 1:
            w_uk = reference.kv_b_halves(kv_b_weight, H, N)[0]
            return norm_rope.mla_new_tokens_absorbed(q_pe, c_kv, k_pe, cos, sin, norm_weight, eps, cache, positions,
                                                     q_nope, w_uk)
        return norm_rope.mla_new_tokens(q_pe, c_kv, k_pe, cos, sin, norm_weight, eps, cache, positions), None
    k_pe = rotary(k_pe.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)
    kv.write(positions, torch.cat((rms_norm(c_kv, norm_weight, eps), k_pe), dim=-1))
    return rotary(q_pe, cos, sin, interleaved=True), None


# ---- MoE --------------------------------------------------------------------------------------------

def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _cuda_inference(gate_up):
        return moe_glue.silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
    return reference.silu_mul(gate_up)


class MoEInput(NamedTuple):
    """What add_norm_logits made for `moe` besides the norm: the router's float32 logits [N, E] and,
    where the int4 experts' gate/up gemv reads the norm as x pairs (kernels/x_pairs.py), those pairs
    and the chain they were made for (else None and 0)."""
    logits: torch.Tensor
    x_pairs: Optional[torch.Tensor] = None
    chain: int = 0


def add_norm_logits(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    router_weight: torch.Tensor, routing: Routing, training: bool, gate_up=None,
                    always_on: int = 0):
    """The MoE block's input: (x + delta, rms_norm of it, a MoEInput for `moe`, or None where `moe`
    computes the router's logits itself). One kernel (router.add_norm_logits) up to
    MAX_ROUTER_GEMV_TOKENS rows where the router kernels route; inside the decode step's compiled
    regions it replaces two kernels (the sum with the norm, the logits' gemv) a MoE layer. Where the
    experts' stack `gate_up` (with `always_on` shared experts) is int4 and takes the gemv, the same
    kernel writes the norm as that gemv's x pairs too (router.add_norm_logits_pairs): the gemv then
    loads them instead of making them from the norm in every program (on an H200, benchmarks/RESULTS.md
    forty-seventh session, small's one-token gate/up 11.2 -> 10.4 us)."""
    h = x.shape[-1]
    if _routes_by_kernel(x, routing, training) and _decode_sized(x, MAX_ROUTER_GEMV_TOKENS) \
            and x.dtype == delta.dtype == norm_weight.dtype == router_weight.dtype \
            and x.stride(-1) == delta.stride(-1) == 1 and router_weight.is_contiguous():
        rows, deltas = x.reshape(-1, h), delta.reshape(-1, h)
        chain = _gate_up_pairs_chain(rows, gate_up, rows.shape[0] * (routing.top_k + always_on))
        if chain:
            total, normed, logits, pairs = router.add_norm_logits_pairs(rows, deltas, norm_weight, eps, router_weight,
                                                                        chain)
        else:
            (total, normed, logits), pairs = router.add_norm_logits(rows, deltas, norm_weight, eps, router_weight), None
        return total.view(x.shape), normed.view(x.shape), MoEInput(logits, pairs, chain)
    total = x + delta
    return total, rms_norm(total, norm_weight, eps), None


def _gate_up_pairs_chain(x: torch.Tensor, gate_up, pairs: int) -> int:
    """The chain of the int4 expert gate/up gemv that `moe` runs on x's `pairs` (token, expert) pairs,
    for which add_norm_logits writes x as that gemv's x pairs; 0 where `moe` takes another path."""
    if not (isinstance(gate_up, QuantizedWeight) and gate_up.bits == 4 and _quant_expert_gemv_sized(x, gate_up)):
        return 0
    return quant_gemv.gate_up_pairs_chain(gate_up.shape[-1], gate_up.shape[-2] // 2, gate_up.group, pairs)


def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], routing: Routing, always_on: int,
          training: bool, logits: Optional[torch.Tensor] = None):
    """Expert ids and weights of every token (see reference.route); `logits`: the router's, where
    add_norm_logits made them."""
    if _routes_by_kernel(x, routing, training):  # float32 logits, then one kernel for the top-k
        logits = _router_logits(x, weight) if logits is None else logits
        return router.route(logits, bias, *_kernel_routing(routing), always_on)
    return reference.route(x, weight, bias, routing, always_on)


def moe(x: torch.Tensor, router_weight: torch.Tensor, bias: Optional[torch.Tensor], routing: Routing, always_on: int,
        gate_up, down, training: bool, prepared: Optional[MoEInput] = None) -> torch.Tensor:
    """x [N, h] through the DeepSeekMoE experts: each token routed (`route`), then its (token, expert)
    pairs through the stacks (`experts`); `prepared`: the router's logits (and x's pairs) where
    add_norm_logits made them.
    Where quantized experts take the gemv pair and the routing
    the route kernel, the gate/up gemv's programs each pick their pair's expert from the router's
    logits (router.routed_expert, the route kernel's own choice) and write the ids and weights the
    down gemv and the combine read: one launch fewer a layer. Measured on an H200, small's batch-1
    step (benchmarks/RESULTS.md, forty-second session): int8+head 1795 -> 1678 us, int4+head 1709 ->
    1677; in bf16 the gemv's four-warp programs paid more for the choice than the launch saved (2363
    -> 2396 us), so bf16 keeps the route kernel."""
    logits = prepared.logits if prepared is not None else None
    if _quant_expert_gemv_sized(x, gate_up) and _routes_by_kernel(x, routing, training):
        top_k, sigmoid, normalize, scale = _kernel_routing(routing)
        logits = _router_logits(x, router_weight) if logits is None else logits
        x_in, x_chain = (prepared.x_pairs, prepared.chain) if prepared is not None and prepared.chain else (x, 0)
        chain = _act_pairs_chain(gate_up, down, x.shape[0] * (top_k + always_on))
        act, ids, weights = quant_gemv.routed_gate_up(x_in, gate_up.qweight, gate_up.scale, gate_up.zero, logits, bias,
                                                      top_k, top_k + always_on, sigmoid, normalize, scale, chain,
                                                      x_chain, x.dtype)
        return _combine_pairs(_quant_gemv(act, down, ids.flatten(), 1, False, chain, x.dtype), weights)
    ids, weights = route(x, router_weight, bias, routing, always_on, training, logits)
    return experts(x, gate_up, down, ids, weights)


def _routes_by_kernel(x: torch.Tensor, routing: Routing, training: bool) -> bool:
    """Whether the router kernels can route: one expert group, eval mode, bf16/fp16 on CUDA."""
    return (routing.method == "greedy" or routing.n_group == 1) and not training and _half_on_cuda(x)


def _kernel_routing(routing: Routing) -> tuple:
    """The router kernels' (top_k, sigmoid, normalize, scale) of a Routing."""
    return routing.top_k, routing.scoring == "sigmoid", routing.top_k > 1 and routing.normalize, float(routing.scale)


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's float32 logits [N, E]: by gemv up to MAX_ROUTER_GEMV_TOKENS rows."""
    if x.shape[0] <= MAX_ROUTER_GEMV_TOKENS:
        return gemv.gemv(x, weight, None, 1, False, True)
    return F.linear(x.float(), weight.float())


def _quant_expert_gemv_sized(x: torch.Tensor, gate_up) -> bool:
    """Whether x's rows take the quantized expert gemv pair (up to QUANT_EXPERT_GEMV_ROWS)."""
    return isinstance(gate_up, QuantizedWeight) and _decode_sized(x, QUANT_EXPERT_GEMV_ROWS[gate_up.bits])


def experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """Stacked expert MLPs ([E, 2I, h] gate+up, [E, h, I] down) on x [N, h] for the (token, expert)
    pairs `ids` [N, k] -> sum_k weights * expert(x), [N, h] in x's dtype (combined in float32)."""
    k = ids.shape[1]
    flat_ids = ids.flatten()
    quantized = isinstance(gate_up, QuantizedWeight)
    if _quant_expert_gemv_sized(x, gate_up):  # int8/int4 bytes read by the gemv
        chain = _act_pairs_chain(gate_up, down, len(flat_ids))
        act = _quant_gemv(x, gate_up, flat_ids, k, True, pairs_chain=chain)
        return _combine_pairs(_quant_gemv(act, down, flat_ids, 1, False, chain, x.dtype), weights)
    if quantized and _decode_sized(x, min(QUANT_EXPERT_SCAN_ROWS[gate_up.bits], MOE_DECODE_ROWS)) \
            and _tile_dequantizable(gate_up) and _tile_dequantizable(down):  # each expert finds its rows
        act = moe_decode.quant_expert_gemm(x, gate_up.qweight, gate_up.scale, gate_up.zero, ids, k, True)
        out = moe_decode.quant_expert_gemm(act, down.qweight, down.scale, down.zero, ids, 1, False)
        return _combine_pairs(out, weights)
    if not quantized and _decode_sized(x, MAX_GEMV_TOKENS):  # each chosen expert read directly, no sorting
        act = gemv.gemv(x, gate_up, flat_ids, k, True)
        return _combine_pairs(gemv.gemv(act, down, flat_ids, 1, False), weights)
    if not quantized and _decode_sized(x, MOE_DECODE_ROWS):  # each expert finds its rows, no sorting
        act = moe_decode.expert_gemm(x, gate_up, ids, k, True)
        return _combine_pairs(moe_decode.expert_gemm(act, down, ids, 1, False), weights)
    # stable sort by expert; one-byte keys make the GPU radix sort a single pass
    num_experts = gate_up.shape[0]
    keys = flat_ids.to(torch.uint8) if num_experts <= 256 else flat_ids
    order = keys.argsort(stable=True)
    rows = x[order // k]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    if quantized and _half_on_cuda(x) and _tile_dequantizable(gate_up) and _tile_dequantizable(down) \
            and not _dequantize_whole(gate_up, len(flat_ids), x):
        block_m = quant_grouped_gemm.block_rows(gate_up.bits == 4, len(flat_ids), num_experts)
        act = silu_mul(quant_grouped_gemm.grouped_gemm(rows, gate_up.qweight, gate_up.scale, gate_up.zero, ends,
                                                       block_m))
        out_sorted = quant_grouped_gemm.grouped_gemm(act, down.qweight, down.scale, down.zero, ends, block_m)
    elif grouped_mm_supported(x):  # a quantized stack is dequantized just before its GEMM and freed after it
        act = silu_mul(torch._grouped_mm(rows, dense_weight(gate_up, x.dtype).transpose(1, 2), offs=ends))
        out_sorted = torch._grouped_mm(act, dense_weight(down, x.dtype).transpose(1, 2), offs=ends)
    else:
        out_sorted = _per_expert(rows, ends, dense_weight(gate_up, x.dtype), dense_weight(down, x.dtype))
    if _cuda_inference(out_sorted):  # gather-combine in one kernel
        slots = torch.empty_like(order)
        slots[order] = torch.arange(len(order), device=order.device)
        return moe_glue.combine_sorted(out_sorted, slots, weights)
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return reference.combine(out, weights)


def _combine_pairs(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The decode paths' expert outputs [N*k, h] in pair order combined with their weights (float32
    sums, as reference.combine): inside torch.compile as k elementwise terms added in pair order, which
    inductor fuses into the residual sum and norm that follow (a sum over a dimension of 8 would be a
    reduction kernel of its own); otherwise one kernel."""
    if not torch.compiler.is_compiling():
        return moe_glue.combine_pairs(outputs, weights)
    N, k = weights.shape
    pairs = outputs.view(N, k, -1)
    total = pairs[:, 0].float() * weights[:, :1]
    for j in range(1, k):
        total = total + pairs[:, j].float() * weights[:, j:j + 1]
    return total.to(outputs.dtype)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] @ the quantized weight [N, K].T (+ bias) -> [..., N] in x's dtype."""
    if _decode_sized(x, QUANT_LINEAR_GEMV_ROWS[weight.bits]):
        out = _quant_gemv(x.reshape(-1, x.shape[-1]), weight, None, 1, False)
    elif _decode_sized(x, QUANT_LINEAR_TILE_ROWS[weight.bits]) and _dense_tiles_pay(weight):
        out = quant_grouped_gemm.dense_gemm(x.reshape(-1, x.shape[-1]), weight.qweight, weight.scale, weight.zero)
    else:
        return F.linear(x, dense_weight(weight, x.dtype), bias)
    out = out.view(*x.shape[:-1], -1)
    return out + bias if bias is not None else out


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor: a QuantizedWeight dequantized to `dtype` (one kernel on CUDA),
    anything else as it is."""
    if not isinstance(weight, QuantizedWeight):
        return weight
    if _cuda_inference(weight.qweight):
        return quant_gemv.dequantize(weight.qweight, weight.scale, weight.zero, dtype)
    return weight.dequantize(dtype)


def _dequantize_whole(weight: QuantizedWeight, pairs: int, x: torch.Tensor) -> bool:
    """Whether `pairs` (token, expert) pairs take the stack dequantized whole into torch's grouped GEMM
    (QUANT_STACK_DEQUANTIZE_ROWS) rather than the grouped GEMM that dequantizes tile by tile."""
    least = QUANT_STACK_DEQUANTIZE_ROWS[weight.bits]
    return (least is not None and pairs >= least * weight.shape[0] and not torch.cuda.is_current_stream_capturing()
            and grouped_mm_supported(x))


def _dense_tiles_pay(weight: QuantizedWeight) -> bool:
    """Whether a linear layer's weight is one the dense tiles read faster than its dequantized copy:
    int8 always, int4 where a row is at most QUANT_LINEAR_TILE_INT4_GROUPS groups long."""
    if weight.bits == 8:
        return True
    return _tile_dequantizable(weight) and weight.shape[-1] // weight.group <= QUANT_LINEAR_TILE_INT4_GROUPS


def _tile_dequantizable(weight: QuantizedWeight) -> bool:
    """Whether the tile kernels (grouped GEMM, dense tiles, scanning GEMM) can take the weight: int4 tiles are
    one group wide, at least quant_grouped_gemm.MIN_GROUP columns."""
    return weight.bits == 8 or weight.group >= quant_grouped_gemm.MIN_GROUP


def _quant_gemv(x, weight: QuantizedWeight, ids, rows_per_id: int, silu_mul: bool, x_chain: int = 0,
                out_dtype: Optional[torch.dtype] = None, pairs_chain: int = 0):
    """quant_gemv.gemv on the weight's tensors; x_chain > 0: x is the x pairs a gate/up gemv wrote with
    that chain (out_dtype: the activations' dtype); pairs_chain > 0: write such pairs."""
    return quant_gemv.gemv(x, weight.qweight, weight.scale, weight.zero, ids, rows_per_id, silu_mul, pairs_chain,
                           x_chain, out_dtype)


def _act_pairs_chain(gate_up: QuantizedWeight, down: QuantizedWeight, pairs: int) -> int:
    """The chain for which the experts' gate/up gemv over `pairs` (token, expert) pairs writes its
    output as the down gemv's x pairs (quant_gemv.act_pairs_chain); 0: plain activations."""
    if gate_up.bits != 4 or down.bits != 4:
        return 0
    return quant_gemv.act_pairs_chain(gate_up.shape[-1], down.shape[-1], gate_up.group, down.group, pairs)


def decode_is_capturable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a CUDA decode step can be captured in a CUDA graph: in bfloat16 / float16 (expert gemv,
    native grouped GEMMs), not in float32, where torch's grouped GEMM reads the group offsets back to
    the host (capture fails; seen on an H200 with torch 2.11)."""
    return device.type != "cuda" or dtype in (torch.bfloat16, torch.float16)


def _per_expert(rows, ends, gate_up, down):
    """Fallback for a torch without grouped GEMM on this device: one expert at a time (this reads the
    group boundaries on the host)."""
    out = torch.empty_like(rows)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            act = silu_mul(F.linear(rows[start:end], gate_up[e]))
            out[start:end] = F.linear(act, down[e])
        start = end
    return out


_GROUPED_MM_SUPPORT = {}


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for x's device and dtype (probed once per pair)."""
    key = (x.device.type, x.device.index, x.dtype)
    if key not in _GROUPED_MM_SUPPORT:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(16, 16, device=x.device, dtype=x.dtype)
                b = torch.ones(2, 16, 16, device=x.device, dtype=x.dtype)
                offs = torch.tensor([8, 16], device=x.device, dtype=torch.int32)
                ok = bool(torch._grouped_mm(a, b.transpose(1, 2), offs=offs)[0, 0] == 16)
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_SUPPORT[key] = ok
    return _GROUPED_MM_SUPPORT[key]


# ---- output head ------------------------------------------------------------------------------------

# The LM head (129280 outputs) at decode rows, on an H200 (benchmarks/lm_head_rows.py, benchmarks/RESULTS.md,
# thirty-eighth session). A gemv reads the head once a row: from 2 rows cuBLAS is faster in bf16 (small:
# 239 against 127 us) and the dense tiles in int8 (133 against 81). The int8 dense tiles weight tile
# first (16-row programs) read it once per 16 rows: past 16 rows the rows-first GEMM in 64-row
# programs is faster (small at 32 rows 122 against 148 us, 64 rows 127 against 263; bf16 137, 150).
LM_HEAD_GEMV_ROWS = 1
LM_HEAD_WEIGHT_FIRST_ROWS = 16


def lm_head(x: torch.Tensor, weight) -> torch.Tensor:
    """x [rows, h] @ weight.T (no bias). A quantized head (int8): the gemv at one row, the dense tiles
    weight tile first up to LM_HEAD_WEIGHT_FIRST_ROWS, rows first past them; never dequantized whole
    on CUDA."""
    if isinstance(weight, QuantizedWeight):
        if _decode_sized(x, LM_HEAD_GEMV_ROWS):
            return _quant_gemv(x, weight, None, 1, False)
        if _half_on_cuda(x) and _tile_dequantizable(weight):
            block_m = 16 if x.shape[0] <= LM_HEAD_WEIGHT_FIRST_ROWS else 64
            return quant_grouped_gemm.dense_gemm(x, weight.qweight, weight.scale, weight.zero, block_m)
        return F.linear(x, dense_weight(weight, x.dtype))
    if _decode_sized(x, LM_HEAD_GEMV_ROWS):  # gemv: 2-5% faster than cuBLAS at one row
        return gemv.gemv(x, weight, None, 1, False)
    return F.linear(x, weight)


# ---- attention over the cache -----------------------------------------------------------------------

# PyTorch prefers cuDNN's attention on Hopper GPUs, which builds an execution plan for every new
# shape: about 50 ms on an H200 (torch 2.11) the first time a prompt length or an image's tile count
# is seen, several times the whole prefill. Flash and memory-efficient attention need no plan and
# cost ~0.06 ms more per layer at 2k tokens (benchmarks/RESULTS.md, 2026-11-29).
PLAN_FREE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(x: torch.Tensor):
    """The context every SDPA call on x's device runs in (the vision tower's too)."""
    return sdpa_kernel(PLAN_FREE_SDPA) if x.is_cuda else contextlib.nullcontext()


def mha_attention(q: torch.Tensor, keys_values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B, H, S, D] over keys_values [B, 2, kv_heads, kv_len, D], additive mask [B, 1, S, kv_len]
    (None: plain causal) -> [B, S, H * D]."""
    B, H, S, D = q.shape
    if mask is not None and S == 1 and _half_on_cuda(q) and _pow2(D, least=16):
        return decode_attention.mha_decode(q[:, :, 0], keys_values, mask[:, 0, 0], D**-0.5).view(B, 1, -1)
    with sdpa_backends(q):
        return reference.mha_attention(q, keys_values, mask)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: Optional[torch.Tensor],
                  kv_b_weight: torch.Tensor, scale: float, q_absorbed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head latent attention: q_nope [B, H, S, nope] and q_pe [B, H, S, rope] (after RoPE) over
    the cached latents [B, kv_len, rank + rope] -> [B, H, S, v]; `q_absorbed`: q_nope already
    absorbed through W_UK, where mla_new_tokens did it.

    Multi-token CUDA calls (prefill) expand the latents to per-head keys and values and use SDPA.
    Otherwise queries are absorbed into the latent space through the key half of kv_b_proj, scores
    are taken against the latents directly (the decode kernel for one token), and the value half of
    kv_b_proj is applied after the softmax."""
    B, H, S, nope = q_nope.shape
    if q_nope.is_cuda and S > 1:
        with sdpa_backends(q_nope):
            return reference.mla_expanded(q_nope, q_pe, latent, mask, kv_b_weight, scale)
    w_uk, w_uv = reference.kv_b_halves(kv_b_weight, H, nope)
    if q_absorbed is None:
        q_absorbed = reference.per_head_matmul(q_nope, w_uk)  # [B, H, S, rank]
    rank, rope = kv_b_weight.shape[-1], q_pe.shape[-1]
    if mask is not None and S == 1 and _half_on_cuda(q_nope) and _pow2(H, rank, rope, least=16):
        in_combine = B <= MLA_COMBINE_VALUES_ROWS and w_uv.shape[1] % 64 == 0  # W_UV applied by the slices' combine
        out = decode_attention.mla_decode(q_absorbed[:, :, 0], q_pe[:, :, 0], latent, mask[:, 0, 0], scale,
                                          w_uv=w_uv if in_combine else None)[:, :, None]
        if in_combine:
            return out
    else:
        out = reference.latent_attention(q_absorbed, q_pe, latent, mask, scale)
    return reference.per_head_matmul(out, w_uv.transpose(1, 2))
