"""The gemv kernel for decode-sized work on CUDA: a few token rows times a large (optionally expert-stacked) weight.

At decode time every projection is a matrix-vector product, bound by reading the weights. For
such shapes cuBLAS picks tiles that occupy few SMs, and the MoE block pays for sorting tokens by
expert before a grouped GEMM. This kernel spreads each weight over many programs instead:

  gemv     out[a] = W[e(a)] @ x[row(a)], one program per (output block, row a); with `ids` the
           weight is the expert `ids[a]` of a stacked [E, N, K] tensor (no sorting, each selected
           expert read once per token), with `silu_mul` the rows [0, N) and [N, 2N) are the gate
           and up halves and the output is silu(gate) * up, rounded like the bf16 reference ops.

Inside compiled regions it is the torch custom op deepseek_vl2::gemv (`custom_ops.kernel_op`). It
launches on its first tensor's GPU, whichever device is current. When it is used (up to
MAX_GEMV_TOKENS rows; the LM head and the experts) is decided in dispatch.py.
"""
from typing import Optional

import torch

from .custom_ops import kernel_op, launch_options, tl, triton

# Token counts up to which these kernels beat the other paths (H100 measurements; on an H200 the
# expert gemv and moe_decode's expert GEMM tie at 2 rows, benchmarks/moe_decode_configs.py). The
# expert gemv reads an expert once per token that picks it (the shared experts once per token), so
# from a few tokens on, a kernel that reads each chosen expert once wins; the LM head gemv reads its
# weight once per row, as the experts' do.
MAX_GEMV_TOKENS = 2


if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def store_rows(out_row, offs_n, n_mask, acc, acc_up, SILU_MUL: tl.constexpr):
        """Store a program's float32 sums in the output dtype; with SILU_MUL silu(gate) * up of the
        gate and up sums (silu_mul_rounded)."""
        out_type = out_row.dtype.element_ty
        if SILU_MUL:
            result = silu_mul_rounded(acc, acc_up, out_type)
        else:
            result = acc
        tl.store(out_row + offs_n, result.to(out_type), mask=n_mask)

    @triton.jit
    def silu_mul_rounded(gate_sums, up_sums, out_type: tl.constexpr):
        """silu(gate) * up (float32) of float32 gate and up sums, rounded to `out_type` where the
        reference's ops in that dtype round: gate, up, silu(gate) (the product is the caller's to round)."""
        gate = gate_sums.to(out_type).to(tl.float32)
        up = up_sums.to(out_type).to(tl.float32)
        return (gate * tl.sigmoid(gate)).to(out_type).to(tl.float32) * up

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, N, K, rows_per_id, stride_x, stride_we, stride_wn, stride_out,
                     HAS_IDS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        await_earlier_kernels(PDL)
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
        store_rows(out_ptr + a * stride_out, offs_n, n_mask, acc, acc_up, SILU_MUL)

    def _gemv_tiles(weight, ids, silu_mul):
        """(output rows per program, K block, warps) measured best in a CUDA graph
        (benchmarks/gemv_configs.py) for the expert gate/up and down shapes of tiny, small and base
        and for the LM heads (H100), and for the MoE routers' 64 or 72 rows (H200: one output row per
        program and the whole row in one K block: 1.6-2.0 us, against 5.4-9.7 us for 4 x 128 tiles,
        whose 16 programs each walked K in ten or more steps)."""
        if silu_mul:
            return 4, 256, 4
        if ids is not None:
            return 4, 512, 2
        if weight.shape[0] >= 32768:  # the LM heads
            return 16, 256, 8
        return 1, 2048, 4  # the routers

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
                           num_warps=num_warps, **launch_options(x))
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
