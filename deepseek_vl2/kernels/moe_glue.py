"""Triton kernels for the memory-bound steps around the MoE expert products on CUDA (the grouped GEMMs
of prefill, the decode kernels' outputs), where plain PyTorch ops make several passes over
[tokens x k, width] tensors:

  silu_mul        the gate+up GEMM output [M, 2I] -> silu(gate) * up [M, I] in one pass, rounded
                  where the reference's bf16 ops round (silu(gate), then the product);
  combine_sorted  expert outputs in expert-sorted order [N*k, h] -> per token the float32 sum of
                  weight * output over its k (token, expert) pairs, gathered through their sorted
                  slots: no unsorting copy and no float32 [N, k, h] temporaries;
  combine_pairs   the same for outputs already in (token, expert) pair order (the gemv and
                  moe_decode kernels write them so).

Inside compiled regions (batched decode) silu_mul and combine_sorted are torch custom ops
(`custom_ops.kernel_op`). combine_pairs is called eagerly only: inside compiled regions dispatch.py
combines pairs with the formula, which inductor fuses into the residual sum and norm after it.
dispatch.py says when to use them; reference.py keeps the equivalent PyTorch ops.
"""
import torch

from ..modeling.devices import on_tensor_device
from .custom_ops import kernel_op, launch_options, tl, triton

if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def _silu_mul_kernel(in_ptr, out_ptr, width, stride_in, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < width
        gate = tl.load(in_ptr + row * stride_in + offs, mask=valid, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * stride_in + width + offs, mask=valid, other=0.0).to(tl.float32)
        out_type = out_ptr.dtype.element_ty
        result = (gate * tl.sigmoid(gate)).to(out_type).to(tl.float32) * up
        tl.store(out_ptr + row * stride_out + offs, result.to(out_type), mask=valid)

    @triton.jit
    def _combine_kernel(src_ptr, slots_ptr, weights_ptr, out_ptr, width, stride_src, stride_out,
                               K: tl.constexpr, SORTED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        token = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < width
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            slot = token * K + j
            if SORTED:
                slot = tl.load(slots_ptr + slot).to(tl.int64)
            weight = tl.load(weights_ptr + token * K + j)
            acc += weight * tl.load(src_ptr + slot * stride_src + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)

    @kernel_op("silu_mul", lambda gate_up: gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2))
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [M, 2I] (gate columns first) -> silu(gate) * up [M, I]."""
        M, width = gate_up.shape[0], gate_up.shape[1] // 2
        gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
        out = gate_up.new_empty(M, width)
        block = min(1024, triton.next_power_of_2(width))
        if M:
            _silu_mul_kernel[(M, triton.cdiv(width, block))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                             BLOCK=block, num_warps=4, **launch_options(out))
        return out

    @kernel_op("combine_sorted", lambda outputs, slots, weights: outputs.new_empty(weights.shape[0], outputs.shape[1]))
    def combine_sorted(outputs: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """outputs [N*k, h] in sorted order, slots [N*k] (where pair (n, j) = n*k + j sits in
        `outputs`), weights [N, k] float32 -> [N, h] in outputs' dtype."""
        return _combine_launch(outputs, slots.contiguous(), weights)

    @on_tensor_device
    def combine_pairs(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """outputs [N*k, h] with pair (n, j) at row n*k + j, weights [N, k] float32 -> [N, h] in
        outputs' dtype."""
        return _combine_launch(outputs, None, weights)

    def _combine_launch(outputs, slots, weights):
        N, k = weights.shape
        width = outputs.shape[1]
        outputs = outputs if outputs.stride(-1) == 1 else outputs.contiguous()
        out = outputs.new_empty(N, width)
        block = min(1024, triton.next_power_of_2(width))
        if N:
            _combine_kernel[(N, triton.cdiv(width, block))](
                outputs, slots if slots is not None else outputs, weights.float().contiguous(), out, width,
                outputs.stride(0), out.stride(0), K=k, SORTED=slots is not None, BLOCK=block, num_warps=4,
                **launch_options(out))
        return out
