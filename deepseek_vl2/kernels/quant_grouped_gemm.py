"""Grouped GEMM over quantized expert stacks for prefill-sized inputs on CUDA: the rows sorted by
expert (as dispatch.experts sorts them) times each one's expert weight, dequantized tile by tile in
registers and fed to tensor-core dots, so the bf16 copy of a layer's experts is never written.

    block_m = block_rows(int4, M, E)
    grouped_gemm(rows [M, K], qweight/scale/zero of a stack [E, N, K], ends [E], block_m) -> [M, N]
    dense_gemm(x [M, K], qweight/scale/zero of one weight [N, K]) -> [M, N]    a linear layer, decode rows

Each program takes BLOCK_M rows of one expert (`block_rows`) and BLOCK_N output columns. Each
program finds its expert and rows itself from the experts' cumulative row ends (`row_block`): the
blocks of BLOCK_M rows are numbered expert by expert, at most cdiv(M, BLOCK_M) + E of them, a fixed
grid whose surplus programs exit at once, so nothing is read back to the host, no kernel lays the
blocks out first, and the calls can be captured in a CUDA graph. int4 tiles are one quantization
group wide (BLOCK_K = group), so a tile needs one scale and zero point per output column; int8
tiles dot the integer values (exact in bf16) and apply the per-column scale to the accumulator at
the end.
Where the experts average few rows (a decode batch) a program takes 16 rows and the dot runs the
other way round, weight tile first (out^T = W rows^T): on Hopper the dequantized tile then feeds
the tensor cores from registers, and the few rows are the dot's narrow side, not a 64-row minimum.
Where the tiles divide the weight (every real stack) they load without masks. int4 tiles in the
usual orientation (rows first) turn a nibble into its float by OR-ing it into 2^23's mantissa and
subtracting 2^23 (quant_gemv.MAGIC), 3-7% faster there than the int-to-float conversion, which the
weight-first tiles keep (the trick made them 7-13% slower; benchmarks/RESULTS.md, 2026-12-02).
The same kernel takes one weight for every row (`dense_gemm`, DENSE): a decode batch's rows through
a linear layer, in 16-row programs weight tile first, with output tiles as narrow as 16 so that a
layer of few outputs still spreads over the GPU (`dense_tiles`).
When each runs is decided in dispatch.py.
"""
from typing import Optional

import torch

from .custom_ops import kernel_op, launch_options, tiles_or_defaults, tl, triton
from .quant_gemv import MAGIC

# int4 tiles are one group wide. Tiles of 16 columns (the least a tensor-core dot takes) gave wrong
# products with 2 warps on an H200 under Triton 3.6 (the weight-first dense and scanning GEMMs, relative
# error about 1; right with 4 warps and one stage; benchmarks/RESULTS.md 2026-12-02, thirty-first
# session), so groups under 32 columns take the dequantized weight instead. No real model has them.
MIN_GROUP = 32
# (token, expert) pairs an expert, on average, below which programs take 16 rows, weight tile first.
# Measured on an H200 at small's and base's stacks (benchmarks/quant_gemv_configs.py --only
# grouped-rows, benchmarks/RESULTS.md 2026-12-02): up to 128 tokens (about 14-16 pairs an expert)
# 1.1-1.5x (int8) and 1.7-2.3x (int4) faster than the 64 / 128-row programs; at 256 tokens (28-31)
# int4 4-11% faster but int8 1.4-1.6x slower; from 512 tokens slower for both.
FEW_ROWS = 16


if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def _stored_tile(q_base, cols, n_mask, k0, K, stride_qn, INT4: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """The weight tile's stored values from column k0: int4 [BLOCK_N, BLOCK_K / 2] packed bytes as
        int32, int8 [BLOCK_N, BLOCK_K] values."""
        if INT4:
            stored_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            stored_k = K // 2
        else:
            stored_cols = k0 + tl.arange(0, BLOCK_K)
            stored_k = K
        ptrs = q_base + cols[:, None] * stride_qn + stored_cols[None, :]
        if EVEN:
            stored = tl.load(ptrs)
        else:
            stored = tl.load(ptrs, mask=n_mask[:, None] & (stored_cols < stored_k)[None, :], other=0)
        if INT4:
            stored = stored.to(tl.int32)
        return stored

    @triton.jit
    def dequantized_tile(q_base, s_base, z_base, cols, n_mask, k0, K, stride_qn, stride_sn, magic, dtype,
                         INT4: tl.constexpr, EVEN: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight tile [BLOCK_N, BLOCK_K] of output columns `cols` from column k0 in `dtype`: int4
        dequantized with its group's scale and zero point (the tile is one group, k0 // BLOCK_K);
        int8 as its integer values (exact in bf16; the column's scale goes on the accumulator).
        WEIGHTS_FIRST: the nibbles converted to float directly, which the weight-first dot's
        register operand prefers; else through 2^23's mantissa (quant_gemv.MAGIC)."""
        stored = _stored_tile(q_base, cols, n_mask, k0, K, stride_qn, INT4, EVEN, BLOCK_K)
        if INT4:
            group = k0 // BLOCK_K
            if EVEN:
                scale = tl.load(s_base + cols * stride_sn + group).to(tl.float32)
                zero = tl.load(z_base + cols * stride_sn + group).to(tl.float32)
            else:
                scale = tl.load(s_base + cols * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)
                zero = tl.load(z_base + cols * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)
            if WEIGHTS_FIRST:
                low = (stored & 15).to(tl.float32)
                high = (stored >> 4).to(tl.float32)
            else:  # each nibble ORed into the mantissa of 2^23 (a LOP3), then 2^23 taken off: exact
                low = ((stored & 15) | magic).to(tl.float32, bitcast=True) - 8388608.0
                high = (((stored >> 4) & 15) | magic).to(tl.float32, bitcast=True) - 8388608.0
            values = tl.interleave(low, high)  # [BLOCK_N, BLOCK_K]
            tile = (values * scale[:, None] + zero[:, None]).to(dtype)
        else:
            tile = stored.to(dtype)
        return tile  # one return (Triton 3.6 checks every return's type, constexpr branches too)

    @triton.jit
    def row_block(ends_ptr, E, block, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr):
        """(expert, first row, end row) of the `block`-th block of BLOCK_M rows, the blocks numbered
        expert by expert from the E experts' cumulative row ends (int32 [E]); past the last block
        (expert E - 1, row0, row0): nothing to do. EXPERTS: a power of two >= E."""
        e = tl.arange(0, EXPERTS)
        ends = tl.load(ends_ptr + e, mask=e < E, other=0)
        starts = tl.load(ends_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        blocks = tl.where(e < E, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        block_ends = tl.cumsum(blocks, 0)
        expert = tl.minimum(tl.sum((block_ends <= block).to(tl.int32), 0), E - 1)
        mine = e == expert
        first_block = tl.sum(tl.where(mine, block_ends - blocks, 0), 0)
        row0 = tl.sum(tl.where(mine, starts, 0), 0) + (block - first_block) * BLOCK_M
        row_end = tl.where(block < tl.max(block_ends, 0), tl.sum(tl.where(mine, ends, 0), 0), row0)
        return expert, row0, row_end

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ends_ptr, E, M, N, K, stride_a, stride_qe,
                             stride_qn, stride_se, stride_sn, stride_out, magic, INT4: tl.constexpr,
                             DENSE: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, EVEN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             EXPERTS: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if DENSE:  # one weight for all M rows (a linear layer): program pid_m takes rows from pid_m * BLOCK_M
            row0 = pid_m * BLOCK_M
            row_end = M
            q_base = q_ptr
            s_base = s_ptr
            z_base = z_ptr
        else:
            expert, row0, row_end = row_block(ends_ptr, E, pid_m, BLOCK_M, EXPERTS)
            expert = expert.to(tl.int64)
            q_base = q_ptr + expert * stride_qe
            s_base = s_ptr + expert * stride_se
            z_base = z_ptr + expert * stride_se
        if row0 < row_end:
            rows = row0 + tl.arange(0, BLOCK_M)
            m_mask = rows < row_end
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = cols < N
            if WEIGHTS_FIRST:
                acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                w = dequantized_tile(q_base, s_base, z_base, cols, n_mask, k0, K, stride_qn, stride_sn, magic,
                                     a_ptr.dtype.element_ty, INT4, EVEN, WEIGHTS_FIRST, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + ks[None, :],
                            mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
                if WEIGHTS_FIRST:
                    acc_t += tl.dot(w, tl.trans(a))
                else:
                    acc += tl.dot(a, tl.trans(w))
            if WEIGHTS_FIRST:
                acc = tl.trans(acc_t)
            if not INT4:
                acc *= tl.load(s_base + cols * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    def block_rows(int4: bool, pairs: int, experts: int) -> int:
        """Rows of one expert per program (BLOCK_M; row_block numbers the programs by it) for
        `pairs` (token, expert) pairs over `experts`: 16 where they average under FEW_ROWS an expert,
        else 128 (int4) or 64 (int8)."""
        if pairs < FEW_ROWS * experts:
            return 16
        return 128 if int4 else 64

    def weights_first(block_m: int) -> bool:
        """Whether programs of `block_m` rows dot weight tile first (the rows the narrow side)."""
        return block_m < 64

    def gemm_tiles(int4: bool, group: int, block_m: int):
        """(BLOCK_N, BLOCK_K, warps, stages) for programs of `block_m` rows. Rows first (64 or 128
        rows): the best of 36 tiles on an H200 for the gate/up stacks of small and base in a
        2054-token prefill (benchmarks/quant_gemv_configs.py --only prefill): int4 128 x 128 in 2
        stages, 19-27% faster than the 64 x 128 first guess; int8 64 x 256 in 4 stages, 3-9% faster.
        Weight tile first (16 rows): 64 outputs x 128 columns, 4 warps, 3 stages, the best of 48 at
        32 tokens for both GEMMs of small and base, int4 and int8."""
        if weights_first(block_m):
            return 64, (group if int4 else 128), 4, 3
        return (128, group, 4, 2) if int4 else (256, 64, 4, 4)

    def grouped_gemm_launch(rows, qweight, scale, zero, ends, block_m, block_n=None, block_k=None,
                            num_warps=None, num_stages=None):
        """`ends`: the experts' cumulative row ends (int32 [E]) of rows sorted by expert, or None for one
        weight [N, K'] (a linear layer's) that every row takes; the other tiles by default gemm_tiles'
        (dense_tiles' for one weight, weight tile first)."""
        int4 = zero is not None
        M, K = rows.shape
        N = qweight.shape[-2]
        group = K // scale.shape[-1]
        one_weight_first = ends is None and weights_first(block_m)
        defaults = dense_tiles(int4, N) if one_weight_first else gemm_tiles(int4, group, block_m)
        block_n, block_k, num_warps, num_stages = tiles_or_defaults((block_n, block_k, num_warps, num_stages),
                                                                     defaults)
        if int4:
            block_k = group  # one group per tile
        out = rows.new_empty(M, N)
        dense = ends is None
        if dense:  # qweight [N, K'], scale and zero [N, groups]: one weight for every row
            programs, experts = triton.cdiv(M, block_m), 0
            ends = out  # not read
            stride_qe = stride_se = 0
            stride_qn, stride_sn = qweight.stride(0), scale.stride(0)
        else:
            experts = ends.shape[0]
            programs = triton.cdiv(M, block_m) + experts
            stride_qe, stride_qn = qweight.stride(0), qweight.stride(1)
            stride_se, stride_sn = scale.stride(0), scale.stride(1)
        if M:
            _grouped_gemm_kernel[(programs, triton.cdiv(N, block_n))](
                rows, qweight, scale, zero if int4 else scale, out, ends, experts, M, N, K, rows.stride(0), stride_qe,
                stride_qn, stride_se, stride_sn, out.stride(0), MAGIC, INT4=int4, DENSE=dense,
                WEIGHTS_FIRST=weights_first(block_m), EVEN=N % block_n == 0 and K % block_k == 0, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, EXPERTS=triton.next_power_of_2(max(experts, 1)),
                num_warps=num_warps, num_stages=num_stages, **launch_options(out))
        return out

    def dense_tiles(int4: bool, N: int):
        """(BLOCK_N, BLOCK_K, warps, stages) of a linear layer's N outputs, weight tile first in 16-row
        programs: 16 outputs a tile up to 2048 (int8; int4 up to 4096), 32 up to 8192, 64 above;
        int8 256 columns a tile, int4 one group; 2 warps, 4 stages. The best or next to it of 12-24
        tiles at 4 and 16 rows for every linear layer of tiny, small and base on an H200
        (benchmarks/quant_gemv_configs.py --only dense-rows, benchmarks/RESULTS.md 2026-12-02)."""
        block_n = 16 if N <= (4096 if int4 else 2048) else 32 if N <= 8192 else 64
        return block_n, None if int4 else 256, 2, 4

    def _dense_gemm_fake(x, qweight, scale, zero, block_m=16):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @kernel_op("quant_dense_gemm", _dense_gemm_fake)
    def dense_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   block_m: int = 16) -> torch.Tensor:
        """x [M, K] (a decode batch's rows) @ the quantized weight [N, K'].T -> [M, N], weight tile first
        in 16-row programs (`block_m` 64: rows first, in gemm_tiles' tiles, the weight read once per 64
        rows)."""
        return grouped_gemm_launch(x.contiguous(), qweight, scale, zero, None, block_m)

    def _grouped_gemm_fake(rows, qweight, scale, zero, ends, block_m):
        return rows.new_empty(rows.shape[0], qweight.shape[-2])

    @kernel_op("quant_grouped_gemm", _grouped_gemm_fake)
    def grouped_gemm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     ends: torch.Tensor, block_m: int) -> torch.Tensor:
        """rows [M, K] sorted by expert, `ends` [E] the experts' cumulative row counts (int32), programs
        of `block_m` rows of one expert -> [M, N]."""
        return grouped_gemm_launch(rows.contiguous(), qweight, scale, zero, ends, block_m)
