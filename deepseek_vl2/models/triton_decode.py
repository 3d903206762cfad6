"""Triton kernels for decode-sized work on CUDA: a few token rows times large weights.

At decode time every projection is a matrix-vector product, bound by reading the weights. For
such shapes cuBLAS picks tiles that occupy few SMs, and the MoE block pays for sorting tokens by
expert before a grouped GEMM. These kernels spread each weight over many programs instead:

  gemv     out[a] = W[e(a)] @ x[row(a)], one program per (output block, row a); with `ids` the
           weight is the expert `ids[a]` of a stacked [E, N, K] tensor (no sorting, each selected
           expert read once per token), with `silu_mul` the rows [0, N) and [N, 2N) are the gate
           and up halves and the output is silu(gate) * up, rounded like the bf16 reference ops.
  route    the MoE router: float32 logits (gemv for few tokens), then per token softmax or
           sigmoid, optional correction bias for the choice, top-k by repeated argmax, renormalisation and scaling
           (topk_method greedy, or the n_group == 1 forms of the others); the always-on shared
           experts are appended with weight 1.
  mla_decode
           MLA attention of one new token per row over the latent cache (split-KV flash decoding):
           each latent slice is read once for all heads, and strided cache views need no copies.
  mha_decode
           the same for plain multi-head attention (tiny): one program per (row, head, key slice).

Those called inside compiled regions are torch custom ops there (`kernel_op`). Every launcher
launches on its first tensor's GPU (`devices.on_tensor_device`), whichever device is current.
`decode_sized(x, rows)` says when to use them (the router takes any number of rows); everything
else (the plain projections too, where cuBLAS measured as fast) uses the plain PyTorch ops.
"""
import functools
from typing import Optional

import torch

from .devices import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers never get here without CUDA
    triton = None

# Token counts up to which these kernels beat the general path (H100 measurements). The expert gemv
# reads an expert once per token that picks it (the shared experts once per token), so from a few
# tokens on, sorting by expert and a grouped GEMM that reads each expert once wins; the LM head
# gemv reads its weight once per row, as the experts' do.
MAX_GEMV_TOKENS = 2
MAX_ROUTER_GEMV_TOKENS = 64  # router logits by gemv up to this many tokens, by a float32 GEMM beyond


_KERNEL_OPS = {}  # name -> [launcher, fake, custom op or None]


def kernel_op(name: str, fake):
    """Mark the decorated launcher as the custom op deepseek_vl2::`name` (with `fake` for shape
    inference), so that torch.compile treats it as one opaque kernel, and return a function that
    calls the op while compiling and the launcher directly otherwise: through the dispatcher a call
    costs ~25 us more host time (an H100 host, benchmarks/host_overhead.py), which adds up over the
    hundreds of kernel calls of an eager prefill. The op is registered by `register_kernel_ops`,
    before the first compilation, so that a process that never compiles never pays for it."""

    def wrap(launcher):
        entry = _KERNEL_OPS.setdefault(name, [launcher, fake, None])
        eager = on_tensor_device(launcher)  # compiled regions run on one device, made current by generate

        @functools.wraps(launcher)
        def call(*args, **kwargs):
            return entry[2](*args, **kwargs) if torch.compiler.is_compiling() else eager(*args, **kwargs)

        return call

    return wrap


def register_kernel_ops() -> None:
    """Register every `kernel_op` as a torch custom op (once); call before torch.compile."""
    for name, entry in _KERNEL_OPS.items():
        if entry[2] is None:
            launcher, fake, _ = entry
            op = torch.library.custom_op(f"deepseek_vl2::{name}", mutates_args=())(launcher)
            op.register_fake(fake)
            entry[2] = op


def cuda_inference(x: torch.Tensor) -> bool:
    """Whether the Triton kernels (here and in triton_moe / triton_norm_rope) may take x: on CUDA,
    with grad mode off (they have no backward)."""
    return triton is not None and x.is_cuda and not torch.is_grad_enabled()


def half_on_cuda(x: torch.Tensor) -> bool:
    return cuda_inference(x) and x.dtype in (torch.bfloat16, torch.float16)


def decode_sized(x: torch.Tensor, max_rows: int) -> bool:
    return half_on_cuda(x) and x.numel() // x.shape[-1] <= max_rows


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, N, K, rows_per_id, stride_x, stride_we, stride_wn, stride_out,
                     HAS_IDS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        row = a // rows_per_id
        w_base = w_ptr
        if HAS_IDS:
            w_base = w_ptr + tl.load(ids_ptr + a).to(tl.int64) * stride_we
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + row * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            tile_mask = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=tile_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            if SILU_MUL:
                w_up = tl.load(w_base + (offs_n[:, None] + N) * stride_wn + offs_k[None, :], mask=tile_mask, other=0.0)
                acc_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        out_type = out_ptr.dtype.element_ty
        if SILU_MUL:  # round where the reference's bf16 ops round: gate, up, silu(gate), product
            gate = acc.to(out_type).to(tl.float32)
            up = acc_up.to(out_type).to(tl.float32)
            result = (gate * tl.sigmoid(gate)).to(out_type).to(tl.float32) * up
        else:
            result = acc
        tl.store(out_ptr + a * stride_out + offs_n, result.to(out_type), mask=n_mask)

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, n_experts, scale, TOP_K: tl.constexpr,
                      ALWAYS_ON: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
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
            for i in tl.static_range(TOP_K):
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

    def _gemv_tiles(weight, ids, silu_mul):
        """(output rows per program, K block, warps) measured best in a CUDA graph on an H100
        (benchmarks/gemv_configs.py) for the expert gate/up and down shapes of tiny, small and base
        and for the LM heads; the default for the rest (router logits)."""
        if silu_mul:
            return 4, 256, 4
        if ids is not None:
            return 4, 512, 2
        if weight.shape[0] >= 32768:
            return 16, 256, 8
        return 4, 128, 2

    def _gemv_launch(x, weight, ids, rows_per_id, silu_mul, block_n=None, block_k=None, num_warps=None,
                     out_dtype=None):
        if block_n is None:
            block_n, block_k, num_warps = _gemv_tiles(weight, ids, silu_mul)
        N = weight.shape[-2] // 2 if silu_mul else weight.shape[-2]
        K = weight.shape[-1]
        rows = ids.numel() if ids is not None else x.shape[0]
        out = torch.empty(rows, N, device=x.device, dtype=out_dtype or x.dtype)
        grid = (triton.cdiv(N, block_n), rows)
        _gemv_kernel[grid](x, weight, ids if ids is not None else x, out, N, K, rows_per_id, x.stride(0),
                           weight.stride(0) if ids is not None else 0, weight.stride(-2), out.stride(0),
                           HAS_IDS=ids is not None, SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k,
                           num_warps=num_warps)
        return out

    def _gemv_fake(x, weight, ids, rows_per_id, silu_mul, float32_out=False):
        rows = ids.numel() if ids is not None else x.shape[0]
        n = weight.shape[-2] // 2 if silu_mul else weight.shape[-2]
        return x.new_empty(rows, n, dtype=torch.float32 if float32_out else x.dtype)

    @kernel_op("gemv", _gemv_fake)
    def gemv(x: torch.Tensor, weight: torch.Tensor, ids: Optional[torch.Tensor], rows_per_id: int,
             silu_mul: bool, float32_out: bool = False) -> torch.Tensor:
        return _gemv_launch(x.contiguous(), weight, ids, rows_per_id, silu_mul,
                            out_dtype=torch.float32 if float32_out else None)

    def _route_fake(x, weight, bias, top_k, sigmoid, normalize, scale, always_on=0):
        return (torch.empty(x.shape[0], top_k + always_on, device=x.device, dtype=torch.long),
                torch.empty(x.shape[0], top_k + always_on, device=x.device, dtype=torch.float32))

    @kernel_op("route", _route_fake)
    def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, sigmoid: bool,
              normalize: bool, scale: float, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        T, E = x.shape[0], weight.shape[0]
        if T <= MAX_ROUTER_GEMV_TOKENS:
            logits = _gemv_launch(x.contiguous(), weight, None, 1, False, out_dtype=torch.float32)
        else:
            logits = torch.nn.functional.linear(x.float(), weight.float())
        ids = torch.empty(T, top_k + always_on, device=x.device, dtype=torch.long)
        weights = torch.empty(T, top_k + always_on, device=x.device, dtype=torch.float32)
        _route_kernel[(T,)](logits, bias if bias is not None else logits, ids, weights, E, scale, TOP_K=top_k,
                            ALWAYS_ON=always_on, SIGMOID=sigmoid, HAS_BIAS=bias is not None, NORMALIZE=normalize,
                            BLOCK_E=triton.next_power_of_2(E), num_warps=1)
        return ids, weights



# ---- decode attention: one query token per row, split over the cached keys ----------------------
#
# Flash decoding: each program takes one slice of the keys, keeps a running max and sum of the
# softmax, and writes an unnormalised partial output; a second kernel combines the slices. Scores
# and the softmax are float32; probabilities enter the value product in the activation dtype.

def mla_decode_applies(q_nope: torch.Tensor, kv_rank: int, rope_dim: int) -> bool:
    """One query token per row on CUDA, with dims the kernel's tensor-core dots take (powers of two,
    at least 16: every release; not the tiny test fixtures)."""
    B, H, S, _ = q_nope.shape
    dims_ok = all(d >= 16 and d & (d - 1) == 0 for d in (H, kv_rank, rope_dim))
    return half_on_cuda(q_nope) and S == 1 and dims_ok


def mha_decode_applies(q: torch.Tensor) -> bool:
    """q [B, H, 1, head_dim] on CUDA in bf16/fp16 with a power-of-two head_dim (every release)."""
    B, H, S, D = q.shape
    return half_on_cuda(q) and S == 1 and D >= 16 and D & (D - 1) == 0


if triton is not None:

    @triton.jit
    def _mla_decode_kernel(q_lat_ptr, q_pe_ptr, latent_ptr, mask_ptr, part_ptr, max_ptr, sum_ptr, kv_len, split_len,
                           scale, stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_ln, stride_mb,
                           H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        heads = tl.arange(0, H)
        offs_r = tl.arange(0, R)
        offs_p = tl.arange(0, P)
        q_lat = tl.load(q_lat_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_r[None, :])
        q_pe = tl.load(q_pe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_p[None, :])
        running_max = tl.full((H,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((H,), dtype=tl.float32)
        acc = tl.zeros((H, R), dtype=tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, kv_len)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            rows = latent_ptr + b * stride_lb + offs_n[:, None] * stride_ln
            k_lat = tl.load(rows + offs_r[None, :], mask=valid[:, None], other=0.0)
            k_pe = tl.load(rows + R + offs_p[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(q_lat, tl.trans(k_lat)) + tl.dot(q_pe, tl.trans(k_pe))
            bias = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0.0).to(tl.float32)
            scores = tl.where(valid[None, :], scores * scale + bias[None, :], float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            probs = tl.exp(scores - new_max[:, None])
            alpha = tl.exp(running_max - new_max)
            running_sum = running_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(k_lat.dtype), k_lat)
            running_max = new_max
        base = (b * n_splits + split) * H + heads
        tl.store(part_ptr + base[:, None] * R + offs_r[None, :], acc)
        tl.store(max_ptr + base, running_max)
        tl.store(sum_ptr + base, running_sum)

    @triton.jit
    def _combine_kernel(part_ptr, max_ptr, sum_ptr, out_ptr, n_splits, H: tl.constexpr, D: tl.constexpr,
                        BLOCK_S: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        splits = tl.arange(0, BLOCK_S)
        valid = splits < n_splits
        index = (b * n_splits + splits) * H + h
        maxes = tl.load(max_ptr + index, mask=valid, other=float("-inf"))
        overall = tl.max(maxes, axis=0)
        factors = tl.where(valid, tl.exp(maxes - overall), 0.0)
        total = tl.sum(tl.load(sum_ptr + index, mask=valid, other=0.0) * factors, axis=0)
        offs_d = tl.arange(0, D)
        parts = tl.load(part_ptr + index[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        out = tl.sum(parts * factors[:, None], axis=0) / total
        tl.store(out_ptr + bh * D + offs_d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _mha_decode_kernel(q_ptr, kv_ptr, mask_ptr, part_ptr, max_ptr, sum_ptr, kv_len, split_len, scale,
                           stride_qb, stride_qh, stride_kb, stride_kv, stride_kh, stride_kn, stride_mb,
                           H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // H
        h = bh % H
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
        keys = kv_ptr + b * stride_kb + (h // GROUP) * stride_kh
        running_max = float("-inf")
        running_sum = 0.0
        acc = tl.zeros((D,), dtype=tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, kv_len)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            rows = offs_n[:, None] * stride_kn + offs_d[None, :]
            k = tl.load(keys + rows, mask=valid[:, None], other=0.0)
            v = tl.load(keys + stride_kv + rows, mask=valid[:, None], other=0.0)
            bias = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0.0).to(tl.float32)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale + bias
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            probs = tl.exp(scores - new_max)
            alpha = tl.exp(running_max - new_max)
            running_sum = running_sum * alpha + tl.sum(probs, axis=0)
            acc = acc * alpha + tl.sum(probs[:, None] * v.to(tl.float32), axis=0)
            running_max = new_max
        base = (b * n_splits + split) * H + h
        tl.store(part_ptr + base * D + offs_d, acc)
        tl.store(max_ptr + base, running_max)
        tl.store(sum_ptr + base, running_sum)

    def _splits(rows: int, kv_len: int, block_n: int, programs: int = 264, min_blocks: int = 4):
        """Key slices per row: about `programs` programs in all (to fill the GPU), at least
        `min_blocks` blocks of keys each."""
        wanted = max(1, -(-programs // rows))
        split_len = max(min_blocks * block_n, -(-kv_len // wanted))
        split_len = -(-split_len // block_n) * block_n
        return -(-kv_len // split_len), split_len

    def _split_buffers(rows: int, n_splits: int, H: int, D: int, device):
        """float32 partial outputs [rows * n_splits * H, D], running maxima and sums of the splits."""
        part = torch.empty(rows * n_splits * H, D, device=device, dtype=torch.float32)
        maxes = torch.empty(rows * n_splits * H, device=device, dtype=torch.float32)
        return part, maxes, torch.empty_like(maxes)

    def _combine(part, maxes, sums, out, n_splits, H, D):
        _combine_kernel[(out.shape[0] * H,)](part, maxes, sums, out, n_splits, H=H, D=D,
                                             BLOCK_S=triton.next_power_of_2(n_splits), num_warps=4)
        return out

    @on_tensor_device
    def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
        """q_latent [B, H, R], q_pe [B, H, P], latent [B, kv_len, R + P] (a cache view), mask
        [B or 1, kv_len] additive -> [B, H, R] = softmax(scale * q.k + mask) . latent[..., :R]."""
        B, H, R = q_latent.shape
        P = q_pe.shape[-1]
        kv_len = latent.shape[1]
        block_n = 32
        n_splits, split_len = _splits(B, kv_len, block_n)
        part, maxes, sums = _split_buffers(B, n_splits, H, R, latent.device)
        mask = mask.expand(B, kv_len)  # a mask built without padding has one row for the batch
        _mla_decode_kernel[(B, n_splits)](
            q_latent, q_pe, latent, mask, part, maxes, sums, kv_len, split_len, scale, q_latent.stride(0),
            q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), latent.stride(1), mask.stride(0),
            H=H, R=R, P=P, BLOCK_N=block_n, num_warps=4 if H <= 16 else 8)
        return _combine(part, maxes, sums, q_latent.new_empty(B, H, R), n_splits, H, R)


    @on_tensor_device
    def mha_decode(q: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor, scale: float, block_n: int = 32,
                   programs: int = 1056, min_blocks: int = 1, num_warps: int = 2) -> torch.Tensor:
        """q [B, H, D], keys_values [B, 2, kv_heads, kv_len, D] (a cache view), mask [B or 1, kv_len]
        additive -> [B, H, D] = softmax(scale * q.k + mask) . v. The default tiles measured best at
        tiny's shapes on an H100 (benchmarks/attention_configs.py: 9.9 us against SDPA's 13.4 us
        at batch 1, the same at batch 8)."""
        B, H, D = q.shape
        kv_heads, kv_len = keys_values.shape[2], keys_values.shape[3]
        if keys_values.stride(-1) != 1 or q.stride(-1) != 1:
            raise ValueError("mha_decode needs the head dimension contiguous")
        n_splits, split_len = _splits(B * H, kv_len, block_n, programs, min_blocks)
        part, maxes, sums = _split_buffers(B, n_splits, H, D, q.device)
        mask = mask.expand(B, kv_len)  # a mask built without padding has one row for the batch
        _mha_decode_kernel[(B * H, n_splits)](
            q, keys_values, mask, part, maxes, sums, kv_len, split_len, scale, q.stride(0), q.stride(1),
            keys_values.stride(0), keys_values.stride(1), keys_values.stride(2), keys_values.stride(3),
            mask.stride(0), H=H, GROUP=H // kv_heads, D=D, BLOCK_N=block_n, num_warps=num_warps)
        return _combine(part, maxes, sums, q.new_empty(B, H, D), n_splits, H, D)
