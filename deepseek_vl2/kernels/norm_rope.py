"""Triton kernels for RMSNorm and RoPE, and for the three of MLA's new-token steps together.

In PyTorch ops each is a chain of five to eight small kernels (casts, powers, a mean, products,
a concatenation for rotate-half), and a prefill runs about 80 norms and 54 rotations: the host
time to launch them, not the GPU, sets the prefill time. Each kernel here does one row in one
pass and rounds where the reference's ops round, so bf16 results match the PyTorch formulas up
to float32 reduction order (bit for bit on an H100). The rotary kernels are compiled without
floating-point fusion: with it, Triton turns `round(x * cos) + round(...)` into a fused
multiply-add that skips the first rounding (a quarter of the bf16 results differed).

  rms_norm         x [..., d] -> weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
  rotary           x [B, H, S, D] (any strides, last dim contiguous) -> rotate-half RoPE with
                   cos/sin [B, S, D], optionally reading x's pairs (2i, 2i+1) as halves (MLA's
                   interleaved rope dims, the `deinterleave` of reference.py)
  mla_new_tokens   MLA's work on its new tokens between the projection and attention: the query's
                   rope part rotated, and each token's cache entry (the latent c_kv normalised,
                   then the shared rope key rotated) written into the KV cache, in one kernel
  mla_new_tokens_absorbed
                   the same, and the query's no-rope part absorbed through W_UK (the key half of
                   kv_b_proj) by more programs of that kernel: at one token row it replaces
                   mla_attention's batched product (dispatch.MLA_ABSORB_IN_NEW_TOKENS_ROWS)

rms_norm and rotary serve eager forwards only: inside torch.compile (the CUDA-graph decode
regions) dispatch.py picks the PyTorch formulas instead, so the compiler can fuse them with their
neighbours. There the three MLA steps still made three kernels a layer (the query's rotation, the
latent's sum of squares, the rest with the cache write), so mla_new_tokens is a custom op
(deepseek_vl2::mla_new_tokens, writing the cache in place; mla_new_tokens_absorbed likewise) and
runs in compiled regions too.
None of them has a backward.
"""
import torch

from ..modeling.devices import on_tensor_device
from .custom_ops import kernel_op, launch_options, tl, triton

# Latent columns each absorbing program of mla_new_tokens_absorbed makes (the best of a standalone
# W_UK kernel at one row on an H200: 32 columns, 2 warps, 2.8 us against cuBLAS's 3.4 for small's 16
# heads; benchmarks/RESULTS.md, thirty-sixth session)
ABSORB_COLUMNS = 32

if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def rms_normed(x, w, width, eps):
        """RMSNorm of one row x (zeros past `width`) with weight w, as the reference rounds: normalised
        in float32, rounded to x's dtype, times w (float32, to be rounded by the caller)."""
        x32 = x.to(tl.float32)
        normed = x32 * tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / width + eps)
        return w.to(tl.float32) * normed.to(x.dtype).to(tl.float32)

    @triton.jit
    def _rotated(x1, x2, cos1, cos2, sin1, sin2, out_type: tl.constexpr):
        """Rotate-half RoPE of the halves (x1, x2) (float32) as `out_type`: x * cos + rotate_half(x) *
        sin, each product and the sum rounded as the reference's ops."""
        first = (x1 * cos1).to(out_type).to(tl.float32) + (-x2 * sin1).to(out_type).to(tl.float32)
        second = (x2 * cos2).to(out_type).to(tl.float32) + (x1 * sin2).to(out_type).to(tl.float32)
        return first.to(out_type), second.to(out_type)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, width, stride_x, stride_out, eps, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < width
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
        w = tl.load(w_ptr + offs, mask=valid, other=0.0)
        normed = rms_normed(x, w, width, eps)
        tl.store(out_ptr + row * stride_out + offs, normed.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, S, stride_xb, stride_xh, stride_xs, stride_cb, stride_cs,
                       HALF: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        r = tl.program_id(0)
        b = r // (H * S)
        h = (r // S) % H
        s = r % S
        i = tl.arange(0, HALF)
        x_row = x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh + s * stride_xs
        if INTERLEAVED:
            x1 = tl.load(x_row + 2 * i).to(tl.float32)
            x2 = tl.load(x_row + 2 * i + 1).to(tl.float32)
        else:
            x1 = tl.load(x_row + i).to(tl.float32)
            x2 = tl.load(x_row + HALF + i).to(tl.float32)
        table = b * stride_cb + s * stride_cs
        cos1 = tl.load(cos_ptr + table + i).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF + i).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + i).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF + i).to(tl.float32)
        first, second = _rotated(x1, x2, cos1, cos2, sin1, sin2, out_ptr.dtype.element_ty)
        out_row = out_ptr + r.to(tl.int64) * (2 * HALF)
        tl.store(out_row + i, first)
        tl.store(out_row + HALF + i, second)

    @triton.jit
    def _mla_new_tokens_kernel(q_ptr, c_ptr, k_ptr, cos_ptr, sin_ptr, w_ptr, cache_ptr, pos_ptr, out_ptr, nope_ptr,
                               w_uk_ptr, absorbed_ptr, S, H, eps, stride_qb, stride_qh, stride_qs, stride_cb, stride_cs,
                               stride_kb, stride_ks, stride_tb, stride_ts, stride_lb, stride_ln, stride_pb, stride_ps,
                               stride_nb, stride_nh, stride_ns, stride_wh, stride_wn, R: tl.constexpr,
                               HALF: tl.constexpr, BLOCK_H: tl.constexpr, NOPE: tl.constexpr, BLOCK_A: tl.constexpr,
                               PDL: tl.constexpr):
        """Token t = (b, s) of the new ones: program (t, 0) writes its cache entry, program (t, 1) rotates
        the rope part of its query's heads; programs (t, 2 + j), if the grid has them, absorb the
        query's no-rope part of head j // (R / BLOCK_A) into BLOCK_A latent columns through W_UK."""
        await_earlier_kernels(PDL)
        t = tl.program_id(0)
        b = (t // S).to(tl.int64)
        s = t % S
        i = tl.arange(0, HALF)
        table = b * stride_tb + s * stride_ts
        cos1 = tl.load(cos_ptr + table + i).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF + i).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + i).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF + i).to(tl.float32)
        part = tl.program_id(1)
        if part == 0:  # the entry: [normalised latent, rotated rope key] at the token's slot
            offs_r = tl.arange(0, R)
            latent = rms_normed(tl.load(c_ptr + b * stride_cb + s * stride_cs + offs_r), tl.load(w_ptr + offs_r), R,
                                eps)
            entry = cache_ptr + b * stride_lb + tl.load(pos_ptr + b * stride_pb + s * stride_ps) * stride_ln
            entry_type = cache_ptr.dtype.element_ty
            tl.store(entry + offs_r, latent.to(c_ptr.dtype.element_ty).to(entry_type))
            key = k_ptr + b * stride_kb + s * stride_ks
            key1, key2 = _rotated(tl.load(key + 2 * i).to(tl.float32), tl.load(key + 2 * i + 1).to(tl.float32),
                                  cos1, cos2, sin1, sin2, k_ptr.dtype.element_ty)
            tl.store(entry + R + i, key1.to(entry_type))
            tl.store(entry + R + HALF + i, key2.to(entry_type))
        elif part == 1:  # the query's rope part, every head (pairs (2i, 2i+1) read as halves)
            heads = tl.arange(0, BLOCK_H)[:, None]
            valid = heads < H
            query = q_ptr + b * stride_qb + s * stride_qs + heads * stride_qh + 2 * i[None, :]
            query1, query2 = _rotated(tl.load(query, mask=valid, other=0.0).to(tl.float32),
                                      tl.load(query + 1, mask=valid, other=0.0).to(tl.float32), cos1[None, :],
                                      cos2[None, :], sin1[None, :], sin2[None, :], out_ptr.dtype.element_ty)
            out = out_ptr + ((b * H + heads) * S + s) * (2 * HALF) + i[None, :]
            tl.store(out, query1, mask=valid)
            tl.store(out + HALF, query2, mask=valid)
        else:  # q_nope[h] @ W_UK[h][:, columns] (float32 sums, rounded as a bf16 product is)
            h = (part - 2) // (R // BLOCK_A)
            columns = ((part - 2) % (R // BLOCK_A)) * BLOCK_A + tl.arange(0, BLOCK_A)
            dims = tl.arange(0, NOPE)
            q_nope = tl.load(nope_ptr + b * stride_nb + h * stride_nh + s * stride_ns + dims).to(tl.float32)
            w_uk = tl.load(w_uk_ptr + h * stride_wh + dims[:, None] * stride_wn + columns[None, :]).to(tl.float32)
            absorbed = tl.sum(q_nope[:, None] * w_uk, axis=0)
            tl.store(absorbed_ptr + ((b * H + h) * S + s) * R + columns, absorbed.to(absorbed_ptr.dtype.element_ty))

    @on_tensor_device
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        if rows.shape[0]:
            _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, width, rows.stride(0), width, eps,
                                               BLOCK=triton.next_power_of_2(width), num_warps=4 if width <= 2048 else 8,
                                               **launch_options(out))
        return out

    @on_tensor_device
    def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """x [B, H, S, D], cos/sin [B or 1, S, D] -> [B, H, S, D] (contiguous)."""
        B, H, S, D = x.shape
        if x.stride(-1) != 1:
            x = x.contiguous()
        cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty(B, H, S, D, device=x.device, dtype=x.dtype)
        if out.numel():
            _rotary_kernel[(B * H * S,)](x, cos, sin, out, H, S, x.stride(0), x.stride(1), x.stride(2),
                                         cos.stride(0), cos.stride(1), HALF=D // 2, INTERLEAVED=interleaved,
                                         num_warps=1, enable_fp_fusion=False, **launch_options(out))
        return out

    def _mla_new_tokens_fake(q_pe, c_kv, k_pe, cos, sin, weight, eps, cache, positions):
        return torch.empty(q_pe.shape, device=q_pe.device, dtype=q_pe.dtype)

    @kernel_op("mla_new_tokens", _mla_new_tokens_fake, mutates=("cache",))
    def mla_new_tokens(q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, weight: torch.Tensor, eps: float, cache: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """q_pe [B, H, S, P] (the query's rope part, dims as interleaved pairs), c_kv [B, S, R] and k_pe
        [B, S, P] (the tokens' latents and rope keys), each with its last dim contiguous; cos/sin [B or
        1, S, P]; the latent norm's weight [R] (c_kv's dtype) and eps; `cache` [B, capacity, R + P], one
        MLA layer's cache; `positions` [S] or [B, S], each token's slot. Writes each token's entry
        (rms_norm(c_kv), then rotary(k_pe)) into its slot and returns rotary(q_pe) [B, H, S, P]
        (contiguous), as the PyTorch formulas round them."""
        return _launch_new_tokens(q_pe, c_kv, k_pe, cos, sin, weight, eps, cache, positions, None, None)[0]

    def _mla_new_tokens_absorbed_fake(q_pe, c_kv, k_pe, cos, sin, weight, eps, cache, positions, q_nope, w_uk):
        B, H, S, _ = q_pe.shape
        return (torch.empty(q_pe.shape, device=q_pe.device, dtype=q_pe.dtype),
                torch.empty(B, H, S, w_uk.shape[-1], device=q_pe.device, dtype=q_pe.dtype))

    @kernel_op("mla_new_tokens_absorbed", _mla_new_tokens_absorbed_fake, mutates=("cache",))
    def mla_new_tokens_absorbed(q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, weight: torch.Tensor, eps: float, cache: torch.Tensor,
                                positions: torch.Tensor, q_nope: torch.Tensor,
                                w_uk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`mla_new_tokens`, and in the same kernel the query's no-rope part q_nope [B, H, S, N] (last dim
        contiguous, N a power of two) absorbed into the latent space through W_UK [H, N, R] (rows of R
        contiguous): (rotary(q_pe), q_nope @ W_UK per head [B, H, S, R])."""
        return _launch_new_tokens(q_pe, c_kv, k_pe, cos, sin, weight, eps, cache, positions, q_nope, w_uk)

    def _launch_new_tokens(q_pe, c_kv, k_pe, cos, sin, weight, eps, cache, positions, q_nope, w_uk):
        B, H, S, P = q_pe.shape
        R = c_kv.shape[-1]
        cos, sin = cos.expand(B, S, P), sin.expand(B, S, P)
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        positions = positions.expand(B, S)
        out = torch.empty(B, H, S, P, device=q_pe.device, dtype=q_pe.dtype)
        block_a = min(R, ABSORB_COLUMNS)
        absorbing = q_nope is not None
        absorbed = torch.empty(B, H, S, R, device=q_pe.device, dtype=q_pe.dtype) if absorbing else None
        nope, w = (q_nope, w_uk) if absorbing else (q_pe, weight)  # unread without the absorbing programs
        if out.numel():
            _mla_new_tokens_kernel[(B * S, 2 + (H * (R // block_a) if absorbing else 0))](
                q_pe, c_kv, k_pe, cos, sin, weight, cache, positions, out, nope, w, absorbed if absorbing else out, S, H,
                eps, q_pe.stride(0), q_pe.stride(1), q_pe.stride(2), c_kv.stride(0), c_kv.stride(1), k_pe.stride(0),
                k_pe.stride(1), cos.stride(0), cos.stride(1), cache.stride(0), cache.stride(1), positions.stride(0),
                positions.stride(1), nope.stride(0), nope.stride(1), nope.stride(2) if absorbing else 0,
                w.stride(0) if absorbing else 0, w.stride(1) if absorbing else 0, R=R, HALF=P // 2,
                BLOCK_H=triton.next_power_of_2(H), NOPE=nope.shape[-1] if absorbing else 16, BLOCK_A=block_a,
                num_warps=4, enable_fp_fusion=False, **launch_options(out))
        return out, absorbed
