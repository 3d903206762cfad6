"""Triton kernels for RMSNorm and RoPE in eager CUDA forwards (prefill, plain decoding).

In PyTorch ops each is a chain of five to eight small kernels (casts, powers, a mean, products,
a concatenation for rotate-half), and a prefill runs about 80 norms and 54 rotations: the host
time to launch them, not the GPU, sets the prefill time. Each kernel here does one row in one
pass and rounds where the reference's ops round, so bf16 results match the PyTorch formulas up
to float32 reduction order (bit for bit on an H100). The rotary kernel is compiled without
floating-point fusion: with it, Triton turns `round(x * cos) + round(...)` into a fused
multiply-add that skips the first rounding (a quarter of the bf16 results differed).

  rms_norm  x [..., d] -> weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
  rotary    x [B, H, S, D] (any strides, last dim contiguous) -> rotate-half RoPE with cos/sin
            [B, S, D], optionally reading x's pairs (2i, 2i+1) as halves (MLA's interleaved
            rope dims, the `deinterleave` of reference.py)

Inside torch.compile (the CUDA-graph decode regions) dispatch.py picks the PyTorch formulas instead,
so the compiler can fuse them with their neighbours (hence no custom ops here); with autograd
recording, too (no backward here).
"""
import torch

from ..modeling.devices import on_tensor_device
from .custom_ops import launch_options, tl, triton

if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, width, stride_x, stride_out, eps, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < width
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
        normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=valid)

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
        out_type = out_ptr.dtype.element_ty
        # x * cos + rotate_half(x) * sin, each product and the sum rounded as the reference's ops
        first = (x1 * cos1).to(out_type).to(tl.float32) + (-x2 * sin1).to(out_type).to(tl.float32)
        second = (x2 * cos2).to(out_type).to(tl.float32) + (x1 * sin2).to(out_type).to(tl.float32)
        out_row = out_ptr + r.to(tl.int64) * (2 * HALF)
        tl.store(out_row + i, first.to(out_type))
        tl.store(out_row + HALF + i, second.to(out_type))

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
