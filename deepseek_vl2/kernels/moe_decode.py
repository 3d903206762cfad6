"""Expert MLPs for a batch of decode rows on CUDA, without sorting the rows by expert.

At decode, a few to a few dozen token rows each pick k experts (the shared ones included). The
gemv (gemv.py) reads an expert once per (token, expert) pair, so from a few rows on it reads the
popular experts many times; the general path sorts the pairs by expert, gathers the rows and lays
out blocks for a grouped GEMM, about ten small kernels a layer before any weight is read. Here one
program per (expert, block of output columns) scans the pair ids itself:

  expert_gemm(x [R, K], w [E, N, K] (or [E, 2N, K] with silu_mul), ids [P], rows_per_id) -> [P, N]
      out[p] = w[ids[p]] @ x[p // rows_per_id], in the pairs' own order. A program finds the pairs
      of its expert (a match and a running count over the ids, at most a few hundred), gathers
      their rows BLOCK_M at a time and multiplies them with its weight tile by tensor-core dots:
      each chosen expert's weights are read once per BLOCK_M of its pairs, experts nobody chose
      are not read, and nothing is read back to the host (a fixed grid, capturable in a CUDA
      graph). With silu_mul the gate and up halves are multiplied together and the output is
      silu(gate) * up, rounded as the bf16 reference ops round.

moe_glue.combine_pairs then sums each token's k outputs with their weights. Inside compiled regions
expert_gemm is the custom op deepseek_vl2::expert_gemm (`custom_ops.kernel_op`). dispatch.py decides
when it runs (more than gemv.MAX_GEMV_TOKENS rows, at most MAX_ROWS).
"""
import torch

from .custom_ops import kernel_op, launch_options, tl, triton

MAX_ROWS = 64  # token rows per call: the pair scan holds next_power_of_2(rows x k) ids per program
BLOCK_M = 16  # pairs of one expert per tensor-core dot (the least a dot takes)


if triton is not None:
    from .custom_ops import await_earlier_kernels
    from .gemv import store_rows

    @triton.jit
    def _expert_gemm_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, pairs, N, K, rows_per_id, stride_x, stride_we, stride_wn,
                            stride_out, SILU_MUL: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        expert = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < N
        slots = tl.arange(0, PAIRS)
        hit = (tl.load(ids_ptr + slots, mask=slots < pairs, other=-1) == expert).to(tl.int32)
        count = tl.sum(hit, axis=0)
        rank = tl.where(hit == 1, tl.cumsum(hit, axis=0) - 1, -1)  # place among this expert's pairs
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        for m0 in range(0, count, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_mask = m < count
            pair = tl.sum(tl.where(rank[None, :] == m[:, None], slots[None, :], 0), axis=1)  # [BLOCK_M]
            x_rows = x_ptr + (pair // rows_per_id).to(tl.int64)[:, None] * stride_x
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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

    def gemm_tiles():
        """(BLOCK_N, BLOCK_K, warps, stages): at 16 rows on an H200, the best of 11 configurations for
        tiny's and small's gate/up and tiny's down, within 4% of the best for small's down
        (benchmarks/moe_decode_configs.py)."""
        return 64, 64, 4, 3

    def expert_gemm_launch(x, weight, ids, rows_per_id, silu_mul, block_n=None, block_k=None, num_warps=None,
                           num_stages=None):
        defaults = gemm_tiles()
        block_n, block_k, num_warps, num_stages = (
            default if given is None else given
            for given, default in zip((block_n, block_k, num_warps, num_stages), defaults))
        E = weight.shape[0]
        N = weight.shape[1] // 2 if silu_mul else weight.shape[1]
        K = weight.shape[2]
        pairs = ids.numel()
        out = x.new_empty(pairs, N)
        if pairs:
            _expert_gemm_kernel[(E, triton.cdiv(N, block_n))](
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
        """x [R, K], weight [E, N, K] ([E, 2N, K] gate then up with silu_mul), ids [P] with
        P = R x rows_per_id -> [P, N]."""
        return expert_gemm_launch(x.contiguous(), weight, ids.contiguous(), rows_per_id, silu_mul)
