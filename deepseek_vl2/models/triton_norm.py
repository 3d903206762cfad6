"""RMSNorm as one Triton kernel in eager CUDA forwards (prefill, plain decoding).

In PyTorch ops a norm is a chain of eight small kernels (casts, a power, a mean, rsqrt, products),
and a prefill runs about 80 norms: the host time to launch them, not the GPU, set the prefill
time. The kernel does a row in one pass and rounds where the reference's ops round (its bf16
results equal the PyTorch formula's bit for bit on an H100).

  rms_norm  x [..., d] -> weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)

Inside torch.compile (the CUDA-graph decode regions) the PyTorch formula is used instead, so the
compiler can fuse it with its neighbours (hence no custom op here); with autograd recording,
too (no backward here).
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers never get here without CUDA
    triton = None


def applies(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, width, stride_x, stride_out, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < width
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
        normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=valid)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        if rows.shape[0]:
            _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, width, rows.stride(0), width, eps,
                                               BLOCK=triton.next_power_of_2(width), num_warps=4 if width <= 2048 else 8)
        return out
