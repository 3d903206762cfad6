"""Expert MLPs for a batch of decode rows on CUDA, without sorting the rows by expert.

At decode, a few to a few dozen token rows each pick k experts (the shared ones included). The
gemv (gemv.py) reads an expert once per (token, expert) pair, so from a few rows on it reads the
popular experts many times; the general path sorts the pairs by expert, gathers the rows and lays
out blocks for a grouped GEMM, about ten small kernels a layer before any weight is read. Here one
program per (expert, block of output columns, split of the expert's pairs) scans the pair ids itself:

  expert_gemm(x [R, K], w [E, N, K] (or [E, 2N, K] with silu_mul), ids [R, k], rows_per_id) -> [R k, N]
      out[p] = w[ids.flatten()[p]] @ x[p // rows_per_id], in the pairs' own order. A program finds
      the pairs of its expert (a match and a running count over the ids, at most a few hundred),
      gathers their rows BLOCK_M at a time (its own blocks of them when the expert has more than
      one) and multiplies them with its weight tile by tensor-core dots:
      each chosen expert's weights are read once per BLOCK_M of its pairs, experts nobody chose
      are not read, and nothing is read back to the host (a fixed grid, capturable in a CUDA
      graph). With silu_mul the gate and up halves are multiplied together and the output is
      silu(gate) * up, rounded as the bf16 reference ops round.

  quant_expert_gemm(x, qweight, scale, zero, ids, rows_per_id) the same on an int8 / int4 stack: each
      weight tile dequantized in registers (quant_grouped_gemm.dequantized_tile; int4 one group a
      tile) and dotted weight tile first, the pairs the dot's narrow side, so each chosen expert's
      bytes are read and dequantized once per BLOCK_M of its pairs, where the quantized gemv
      (quant_gemv.py) reads them once per pair.

dispatch.py then sums each token's k outputs with their weights (moe_glue.combine_pairs). Inside
compiled regions both are custom ops (deepseek_vl2::expert_gemm, deepseek_vl2::quant_expert_gemm;
`custom_ops.kernel_op`). dispatch.py decides when they run (bf16: more than gemv.MAX_GEMV_TOKENS
rows, at most MAX_ROWS; quantized: past the gemv's rows, up to its own limit).
"""
from typing import Optional

import torch

from .custom_ops import kernel_op, launch_options, tiles_or_defaults, tl, triton

MAX_ROWS = 64  # token rows per call: the pair scan holds next_power_of_2(rows x k) ids per program
BLOCK_M = 16  # pairs of one expert per tensor-core dot (the least a dot takes)


if triton is not None:
    from .custom_ops import await_earlier_kernels
    from .gemv import store_rows
    from .quant_gemv import MAGIC
    from .quant_grouped_gemm import dequantized_tile

    @triton.jit
    def _pairs_of_expert(ids_ptr, pairs, expert, PAIRS: tl.constexpr):
        """The pair slots [PAIRS], how many pairs chose `expert`, and each slot's place among them (-1:
        another expert's)."""
        slots = tl.arange(0, PAIRS)
        hit = (tl.load(ids_ptr + slots, mask=slots < pairs, other=-1) == expert).to(tl.int32)
        rank = tl.where(hit == 1, tl.cumsum(hit, axis=0) - 1, -1)
        return slots, tl.sum(hit, axis=0), rank

    @triton.jit
    def _expert_program(ids_ptr, pairs, N, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's expert (grid axis 0), its output columns (axis 1) and which exist, the
        expert's pairs (_pairs_of_expert), and the place of its first block of them and the step to
        its next: the grid's third axis splits an expert's blocks, program z taking blocks z, z + Z,
        ... (Z programs), so an expert many rows chose (a shared one) is not one program's serial
        loop."""
        expert = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slots, count, rank = _pairs_of_expert(ids_ptr, pairs, expert, PAIRS)
        first, step = tl.program_id(2) * BLOCK_M, tl.num_programs(2) * BLOCK_M
        return expert.to(tl.int64), cols, cols < N, slots, count, rank, first, step

    @triton.jit
    def _pair_block(x_ptr, stride_x, rows_per_id, slots, rank, count, m0, BLOCK_M: tl.constexpr):
        """The pairs of places m0 .. m0 + BLOCK_M - 1 among an expert's [BLOCK_M], which exist, and
        their input rows' pointers [BLOCK_M, 1]."""
        m = m0 + tl.arange(0, BLOCK_M)
        pair = tl.sum(tl.where(rank[None, :] == m[:, None], slots[None, :], 0), axis=1)
        return pair, m < count, x_ptr + (pair // rows_per_id).to(tl.int64)[:, None] * stride_x

    @triton.jit
    def _expert_gemm_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, pairs, N, K, rows_per_id, stride_x, stride_we, stride_wn,
                            stride_out, SILU_MUL: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        expert, cols, n_mask, slots, count, rank, first, step = _expert_program(ids_ptr, pairs, N, PAIRS, BLOCK_M,
                                                                               BLOCK_N)
        w_base = w_ptr + expert * stride_we
        for m0 in range(first, count, step):
            pair, m_mask, x_rows = _pair_block(x_ptr, stride_x, rows_per_id, slots, rank, count, m0, BLOCK_M)
            acc, acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < K
                x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                tile_mask = n_mask[:, None] & k_mask[None, :]
                w = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=tile_mask, other=0.0)
                acc += tl.dot(x, tl.trans(w))
                if SILU_MUL:
                    w_up = tl.load(w_base + (cols[:, None] + N) * stride_wn + ks[None, :], mask=tile_mask, other=0.0)
                    acc_up += tl.dot(x, tl.trans(w_up))
            out_rows = out_ptr + pair.to(tl.int64)[:, None] * stride_out
            store_rows(out_rows, cols[None, :], m_mask[:, None] & n_mask[None, :], acc, acc_up, SILU_MUL)

    @triton.jit
    def _quant_expert_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, pairs, N, K, rows_per_id, stride_x,
                                  stride_qe, stride_qn, stride_se, stride_sn, stride_out, magic, INT4: tl.constexpr,
                                  SILU_MUL: tl.constexpr, EVEN: tl.constexpr, PAIRS: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  PDL: tl.constexpr):
        """As _expert_gemm_kernel on an int8 / int4 stack: each weight tile dequantized in registers
        (quant_grouped_gemm.dequantized_tile) and dotted weight tile first, the pairs the narrow side."""
        await_earlier_kernels(PDL)
        expert, cols, n_mask, slots, count, rank, first, step = _expert_program(ids_ptr, pairs, N, PAIRS, BLOCK_M,
                                                                               BLOCK_N)
        q_base = q_ptr + expert * stride_qe
        s_base = s_ptr + expert * stride_se
        z_base = z_ptr + expert * stride_se
        for m0 in range(first, count, step):
            pair, m_mask, x_rows = _pair_block(x_ptr, stride_x, rows_per_id, slots, rank, count, m0, BLOCK_M)
            acc_t, acc_up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                w = dequantized_tile(q_base, s_base, z_base, cols, n_mask, k0, K, stride_qn, stride_sn, magic,
                                     x_ptr.dtype.element_ty, INT4, EVEN, True, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
                acc_t += tl.dot(w, tl.trans(x))
                if SILU_MUL:
                    w_up = dequantized_tile(q_base, s_base, z_base, cols + N, n_mask, k0, K, stride_qn, stride_sn,
                                            magic, x_ptr.dtype.element_ty, INT4, EVEN, True, BLOCK_K)
                    acc_up_t += tl.dot(w_up, tl.trans(x))
            acc = tl.trans(acc_t)
            acc_up = tl.trans(acc_up_t)
            if not INT4:  # int8: the columns' scales on the sums
                acc *= tl.load(s_base + cols * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                if SILU_MUL:
                    acc_up *= tl.load(s_base + (cols + N) * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            out_rows = out_ptr + pair.to(tl.int64)[:, None] * stride_out
            store_rows(out_rows, cols[None, :], m_mask[:, None] & n_mask[None, :], acc, acc_up, SILU_MUL)

    def _grid(experts: int, N: int, block_n: int, ids: torch.Tensor):
        """(expert, output block, split): an expert has at most one pair a token row (ids [R, k]), so
        cdiv(R, BLOCK_M) splits give each of its blocks of pairs a program."""
        return experts, triton.cdiv(N, block_n), triton.cdiv(ids.shape[0], BLOCK_M)

    def gemm_tiles():
        """(BLOCK_N, BLOCK_K, warps, stages): at 16 rows on an H200, the best of 11 configurations for
        tiny's and small's gate/up and tiny's down, within 4% of the best for small's down
        (benchmarks/moe_decode_configs.py)."""
        return 64, 64, 4, 3

    def expert_gemm_launch(x, weight, ids, rows_per_id, silu_mul, block_n=None, block_k=None, num_warps=None,
                           num_stages=None):
        defaults = gemm_tiles()
        block_n, block_k, num_warps, num_stages = tiles_or_defaults((block_n, block_k, num_warps, num_stages),
                                                                     defaults)
        E = weight.shape[0]
        N = weight.shape[1] // 2 if silu_mul else weight.shape[1]
        K = weight.shape[2]
        pairs = ids.numel()
        out = x.new_empty(pairs, N)
        if pairs:
            _expert_gemm_kernel[_grid(E, N, block_n, ids)](
                x, weight, ids, out, pairs, N, K, rows_per_id, x.stride(0), weight.stride(0), weight.stride(1),
                out.stride(0), SILU_MUL=silu_mul, PAIRS=max(16, triton.next_power_of_2(pairs)), BLOCK_M=BLOCK_M,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
                **launch_options(x))
        return out

    def _expert_gemm_fake(x, weight, ids, rows_per_id, silu_mul):
        return x.new_empty(ids.numel(), weight.shape[1] // 2 if silu_mul else weight.shape[1])

    @kernel_op("expert_gemm", _expert_gemm_fake)
    def expert_gemm(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows_per_id: int,
                    silu_mul: bool) -> torch.Tensor:
        """x [R, K] (rows_per_id k) or [R k, K] (1), weight [E, N, K] ([E, 2N, K] gate then up with
        silu_mul), ids [R, k] the experts of each token row -> [R k, N]."""
        return expert_gemm_launch(x.contiguous(), weight, ids.contiguous(), rows_per_id, silu_mul)

    def quant_tiles(int4: bool, group: int, silu_mul: bool):
        """(BLOCK_N, BLOCK_K, warps, stages) of the quantized expert GEMM, int4 one group a tile: int4
        gate/up in 64 outputs, 4 warps, 3 stages (its rows, 5-8, dispatch.QUANT_EXPERT_SCAN_ROWS); else
        32 outputs for the gate/up pair (two accumulators), 64 for down, 128 int8 columns, 2 warps, 4
        stages. The best or next to it of 13-15 tiles for small's stacks at 8 and 16 rows on an H200
        (benchmarks/moe_decode_configs.py, benchmarks/RESULTS.md 2026-12-02, thirty-first session)."""
        if int4 and silu_mul:
            return 64, group, 4, 3
        return (32 if silu_mul else 64), (group if int4 else 128), 2, 4

    def quant_expert_gemm_launch(x, qweight, scale, zero, ids, rows_per_id, silu_mul, block_n=None, block_k=None,
                                 num_warps=None, num_stages=None):
        int4 = zero is not None
        K = x.shape[1]
        group = K // scale.shape[-1]
        defaults = quant_tiles(int4, group, silu_mul)
        block_n, block_k, num_warps, num_stages = tiles_or_defaults((block_n, block_k, num_warps, num_stages),
                                                                     defaults)
        if int4:
            block_k = group  # one group per tile
        E = qweight.shape[0]
        N = qweight.shape[1] // 2 if silu_mul else qweight.shape[1]
        pairs = ids.numel()
        out = x.new_empty(pairs, N)
        if pairs:
            _quant_expert_gemm_kernel[_grid(E, N, block_n, ids)](
                x, qweight, scale, zero if int4 else scale, ids, out, pairs, N, K, rows_per_id, x.stride(0),
                qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1), out.stride(0), MAGIC,
                INT4=int4, SILU_MUL=silu_mul, EVEN=N % block_n == 0 and K % block_k == 0,
                PAIRS=max(16, triton.next_power_of_2(pairs)), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=num_warps, num_stages=num_stages, **launch_options(x))
        return out

    def _quant_expert_gemm_fake(x, qweight, scale, zero, ids, rows_per_id, silu_mul):
        return x.new_empty(ids.numel(), qweight.shape[1] // 2 if silu_mul else qweight.shape[1])

    @kernel_op("quant_expert_gemm", _quant_expert_gemm_fake)
    def quant_expert_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                          ids: torch.Tensor, rows_per_id: int, silu_mul: bool) -> torch.Tensor:
        """expert_gemm on an int8 / int4 stack (quantization/rtn.py's layout; int4 groups of at least
        quant_grouped_gemm.MIN_GROUP columns): x [R, K] (rows_per_id k) or [R k, K] (1), ids [R, k] the
        experts of each token row, qweight [E, N', K or K/2] with its scale (and zero) -> [R k, N]."""
        return quant_expert_gemm_launch(x.contiguous(), qweight, scale, zero, ids.contiguous(), rows_per_id, silu_mul)
