"""A candidate int4 kernel for decode steps of 1 to 16 token rows, through tensor cores, against the
int4 gemv in the tree (kernels/quant_gemv.py) and cuBLAS on bf16 weights. A probe: nothing in the
package calls it. Needs an sm_90 GPU (the bfloat16x2 subtraction in the inline PTX).

    python benchmarks/int4_mma_probe.py [--variants small base] [--rows 1 4 16] [--only experts|projections]
                                        [--block-n 64 128] [--block-k 64 128 256] [--warps 1 4] [--stages 3]
                                        [--json out.json]

Why: the gemv spends about 4.6 instructions per weight (a LOP3 to make each nibble a float, an FADD,
an FFMA, and x's rearrangement; benchmarks/RESULTS.md, sixteenth and seventeenth sessions), which
keeps it at 1-2 TB/s of the H200's 4.8. Here one PTX LOP3 turns two nibbles of a 32-bit word
(bits 4i and 4i + 16) into two bfloat16 values 128 + q at once (OR-ed into the mantissa of 128.0,
whose last bit is worth 1), and an MMA multiplies them with x, padded to 16 rows (the rows beyond
the request's are masked to zero). The K order of the MMA follows the pairs (column 2c + h of a
tile is nibble i + 4h of word c, for i = 0..3 in four MMAs), and x is loaded in that order.

  pairs     the group's scale and zero point applied to the pair in bfloat16x2 before the MMA:
            (v - 128) * s + z, one HSUB2 and one HFMA2 per two weights (the weight then rounded to
            bfloat16, as a dequantized copy is); tiles within one group (GROUP % BLOCK_K == 0)
  epilogue  the MMA multiplies 128 + q itself, one group per tile (BLOCK_K == GROUP), and the
            group's scale and zero point come after, in float32:
            s * (sum (128 + q) x - 128 sum x) + z sum x

Compiled for sm_90 without a GPU (Triton 3.8), the loops take 2.1-3.1 instructions per weight at
128 x 128 tiles and 4 warps (SASS counts in RESULTS.md, seventeenth session). On an H200 (eighteenth
session) they are slower than the gemv at one token (small's experts' gate/up 20 against 14 us:
latency, not instructions, bounds a one-token tile) and faster only where several token rows share
a dense layer's weights (its gate/up at 4 rows: 20 against 55 us). For one token's experts (gate/up
with silu, and down) and the dense projections at each row count it prints, per kernel,
microseconds per call inside CUDA graphs (weights cycled past L2, as kernel_timing.graph_us does)
at the best of the tiles tried, and the error of that tile's output against the float32 product of
the dequantized weights (the gemv's too, for scale).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import quant_gemv  # noqa: E402
from deepseek_vl2.kernels.custom_ops import tl, triton  # noqa: E402
from deepseek_vl2.kernels.gemv import store_rows  # noqa: E402
from deepseek_vl2.quantization import rtn  # noqa: E402
from deepseek_vl2.quantization.config import QuantizationConfig  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402
from quant_gemv_configs import EXPERTS, EXPERTS_PER_TOKEN, PROJECTIONS  # noqa: E402

if triton is not None:
    # nibble pairs (i, i + 4) of a word as bfloat16x2 128 + q: (word >> 4i) & 0x000F000F | 0x43004300
    _RAW = [tl.constexpr("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;")] + [
        tl.constexpr(f"{{ .reg .b32 t; shr.u32 t, $1, {4 * i}; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }}")
        for i in (1, 2, 3)]
    # the same, then (v - 128) * s + z in bfloat16x2 ($3, $4: the pair's scale and zero point, twice each)
    _SCALED = [tl.constexpr(
        f"{{ .reg .b32 t, c; mov.b32 c, 0x43004300; shr.u32 t, $1, {4 * i}; "
        "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 t, t, c; fma.rn.bf16x2 $0, t, $3, $4; }")
        for i in range(4)]
    RAW_0, RAW_1, RAW_2, RAW_3 = _RAW
    SCALED_0, SCALED_1, SCALED_2, SCALED_3 = _SCALED

    @triton.jit
    def _raw_pairs(words2, i: tl.constexpr):
        """[BN, 2W] bfloat16 128 + q: column 2c + h holds nibble i + 4h of word c (`words2` holds each word
        twice, side by side, so that one instance of the PTX sees one word and writes its two values)."""
        if i == 0:
            out = tl.inline_asm_elementwise(RAW_0, "=r,r,r", [words2], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 1:
            out = tl.inline_asm_elementwise(RAW_1, "=r,r,r", [words2], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 2:
            out = tl.inline_asm_elementwise(RAW_2, "=r,r,r", [words2], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(RAW_3, "=r,r,r", [words2], dtype=tl.bfloat16, is_pure=True, pack=2)
        return out

    @triton.jit
    def _scaled_pairs(words2, s2, z2, i: tl.constexpr):
        """As _raw_pairs, then (v - 128) * s + z in bfloat16 (s2, z2: [BN, 2W] bfloat16)."""
        if i == 0:
            out = tl.inline_asm_elementwise(SCALED_0, "=r,r,r,r,r", [words2, s2, z2], dtype=tl.bfloat16,
                                            is_pure=True, pack=2)
        elif i == 1:
            out = tl.inline_asm_elementwise(SCALED_1, "=r,r,r,r,r", [words2, s2, z2], dtype=tl.bfloat16,
                                            is_pure=True, pack=2)
        elif i == 2:
            out = tl.inline_asm_elementwise(SCALED_2, "=r,r,r,r,r", [words2, s2, z2], dtype=tl.bfloat16,
                                            is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(SCALED_3, "=r,r,r,r,r", [words2, s2, z2], dtype=tl.bfloat16,
                                            is_pure=True, pack=2)
        return out

    @triton.jit
    def _tile(acc, q_base, s_base, z_base, rows, n_mask, k0, stride_qn, stride_sn, x0, x1, x2, x3, x_sum,
              GROUP: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr):
        """acc [BLOCK_N, 16] plus one tile's products for the weight rows `rows` (x0..x3: x's columns in
        the pairs' order for nibbles i, i + 4, [2W, 16] bfloat16; x_sum: their sum per x row)."""
        words = tl.load(q_base + rows[:, None] * stride_qn + (k0 // 8 + tl.arange(0, W))[None, :],
                        mask=n_mask[:, None], other=0)
        words2 = tl.reshape(tl.join(words, words), (BLOCK_N, 2 * W))
        s_offs = rows * stride_sn + k0 // GROUP
        if EPILOGUE:
            t = tl.dot(_raw_pairs(words2, 0), x0)
            t = tl.dot(_raw_pairs(words2, 1), x1, t)
            t = tl.dot(_raw_pairs(words2, 2), x2, t)
            t = tl.dot(_raw_pairs(words2, 3), x3, t)
            scale = tl.load(s_base + s_offs, mask=n_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_base + s_offs, mask=n_mask, other=0.0).to(tl.float32)
            acc += t * scale[:, None] + (zero - 128.0 * scale)[:, None] * x_sum[None, :]
        else:
            s2 = tl.broadcast_to(tl.load(s_base + s_offs, mask=n_mask, other=0.0)[:, None], (BLOCK_N, 2 * W))
            z2 = tl.broadcast_to(tl.load(z_base + s_offs, mask=n_mask, other=0.0)[:, None], (BLOCK_N, 2 * W))
            acc = tl.dot(_scaled_pairs(words2, s2, z2, 0), x0, acc)
            acc = tl.dot(_scaled_pairs(words2, s2, z2, 1), x1, acc)
            acc = tl.dot(_scaled_pairs(words2, s2, z2, 2), x2, acc)
            acc = tl.dot(_scaled_pairs(words2, s2, z2, 3), x3, acc)
        return acc

    @triton.jit
    def _int4_mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, M, N, K, rows_per_id, stride_xm, stride_qe,
                         stride_qn, stride_se, stride_sn, stride_om, GROUP: tl.constexpr, EPILOGUE: tl.constexpr,
                         HAS_IDS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """Without ids: out[m] = W @ x[m] for the M <= 16 rows of x. With ids: one program column per
        (row, expert) pair a, out[a] = W[ids[a]] @ x[a // rows_per_id] (and silu(gate) * up of the two
        halves with SILU_MUL), x then one row padded to 16."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, 16)
        q_base, s_base, z_base, x_base = q_ptr, s_ptr, z_ptr, x_ptr
        if HAS_IDS:
            a = tl.program_id(1)
            expert = tl.load(ids_ptr + a).to(tl.int64)
            q_base = q_ptr + expert * stride_qe
            s_base = s_ptr + expert * stride_se
            z_base = z_ptr + expert * stride_se
            x_base = x_ptr + (a // rows_per_id) * stride_xm
            m_mask = offs_m[None, :] < 1
        else:
            m_mask = offs_m[None, :] < M
        W: tl.constexpr = BLOCK_K // 8
        j = tl.arange(0, 2 * W)  # a tile's MMA column 2c + h: nibble i + 4h of word c, x column 8c + 4h + i
        x_cols = 8 * (j // 2) + 4 * (j % 2)
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x_ptrs = x_base + offs_m[None, :] * stride_xm + (k0 + x_cols)[:, None]
            x0 = tl.load(x_ptrs, mask=m_mask, other=0.0)
            x1 = tl.load(x_ptrs + 1, mask=m_mask, other=0.0)
            x2 = tl.load(x_ptrs + 2, mask=m_mask, other=0.0)
            x3 = tl.load(x_ptrs + 3, mask=m_mask, other=0.0)
            x_sum = tl.sum(x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32), axis=0)
            acc = _tile(acc, q_base, s_base, z_base, offs_n, n_mask, k0, stride_qn, stride_sn, x0, x1, x2, x3, x_sum,
                        GROUP, EPILOGUE, BLOCK_N, W)
            if SILU_MUL:
                acc_up = _tile(acc_up, q_base, s_base, z_base, offs_n + N, n_mask, k0, stride_qn, stride_sn, x0, x1,
                               x2, x3, x_sum, GROUP, EPILOGUE, BLOCK_N, W)
        if HAS_IDS:
            first = offs_m[None, :] == 0
            store_rows(out_ptr + a * stride_om, offs_n, n_mask, tl.sum(tl.where(first, acc, 0.0), axis=1),
                       tl.sum(tl.where(first, acc_up, 0.0), axis=1), SILU_MUL)
        else:
            tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & m_mask)


def mma_launch(x, qweight, scale, zero, ids, rows_per_id: int, silu_mul: bool, epilogue: bool, block_n: int,
               block_k: int, warps: int, stages: int):
    """As quant_gemv.gemv_launch for int4 weights in rtn.quantize's layout: out [M, N] = x @ W.T for x of
    at most 16 rows, or with `ids` out [pairs, N] of each (row, expert) pair (silu(gate) * up with
    `silu_mul`)."""
    K = x.shape[1]
    N = qweight.shape[-2] // 2 if silu_mul else qweight.shape[-2]
    rows = ids.numel() if ids is not None else x.shape[0]
    group = K // scale.shape[-1]
    if (ids is None and rows > 16) or (silu_mul and ids is None) or K % block_k or (
            group != block_k if epilogue else group % block_k):
        raise ValueError(f"rows={rows} K={K} group={group} BLOCK_K={block_k}: not this kernel's case")
    out = torch.empty(rows, N, device=x.device, dtype=x.dtype)
    words = qweight.view(torch.int32)
    grid = (triton.cdiv(N, block_n), rows if ids is not None else 1)
    _int4_mma_kernel[grid](
        x, words, scale, zero, ids if ids is not None else x, out, rows, N, K, rows_per_id, x.stride(0),
        words.stride(0) if ids is not None else 0, words.stride(-2), scale.stride(0) if ids is not None else 0,
        scale.stride(-2), out.stride(0), GROUP=group, EPILOGUE=epilogue, HAS_IDS=ids is not None,
        SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return out


def fits(tile, K, group, epilogue) -> bool:
    _, block_k, _, _ = tile
    return K % block_k == 0 and (group == block_k if epilogue else group % block_k == 0)


def relative_error(out, reference) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def best(run, tiles, copies, label):
    """(us, tile) of the fastest tile, `run(i, tile)` a thunk on input copy i; tiles that fail to
    compile or launch are reported and skipped."""
    timed = []
    for tile in tiles:
        try:
            timed.append((graph_us(lambda i: run(i, tile), copies), tile))
        except Exception as failure:  # resources: shared memory or registers beyond the GPU's
            print(f"{label} {tile}: {type(failure).__name__}: {failure}"[:300], flush=True)
    return min(timed) if timed else (None, None)


def compare(row, reference, run, copies, tiles, K, group, label):
    """Into `row`: each variant's error against `reference` (float32) and its best time over the
    `tiles` (BLOCK_N, BLOCK_K, warps, stages) that fit it."""
    for epilogue in (False, True):
        kind = "epilogue" if epilogue else "pairs"
        fitting = [t for t in tiles if fits(t, K, group, epilogue)]
        row[f"{kind}_tiles"] = len(fitting)
        us, tile = best(lambda i, t: run(i, epilogue, t), fitting, copies, f"{label} {kind}")
        if tile is not None:
            row[f"{kind}_us"], row[f"{kind}_tile"] = us, tile
            row[f"{kind}_error"] = relative_error(run(0, epilogue, tile)(), reference)


def projections(variants, rows_list, tiles):
    for (name, (N, K)), rows in itertools.product(
            [(n, s) for n, s in PROJECTIONS.items() if n.split()[0] in variants], rows_list):
        group = QuantizationConfig("int4").group_for(K)
        copies = copies_for(N * K // 2)
        weights = [rtn.quantize(torch.randn(N, K, device="cuda") * 0.02, 4, group, torch.bfloat16)
                   for _ in range(copies)]
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ rtn.dequantize(*weights[0], torch.float32).T
        gemv = lambda i: lambda: quant_gemv.gemv_launch(x, *weights[i], None, 1, False)  # noqa: E731
        row = dict(name=name, N=N, K=K, group=group, rows=rows, gemv_us=graph_us(gemv, copies),
                   gemv_error=relative_error(gemv(0)(), reference))
        bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(N * K * 2))]
        row["cublas_bf16_us"] = graph_us(lambda i: lambda: torch.nn.functional.linear(x, bf16[i]), len(bf16))
        compare(row, reference, lambda i, epilogue, tile: lambda: mma_launch(x, *weights[i], None, 1, False, epilogue,
                                                                             *tile), copies, tiles, K, group, name)
        yield row


def experts(variants, tiles):
    """One token's 8 (expert, row) pairs (6 routed + 2 shared), gate/up with silu and down."""
    for variant in variants:
        E, I, h = EXPERTS[variant]
        stacks = {"gate_up": rtn.quantize(torch.randn(E + 2, 2 * I, h, device="cuda") * 0.02, 4,
                                          QuantizationConfig("int4").group_for(h), torch.bfloat16),
                  "down": rtn.quantize(torch.randn(E + 2, h, I, device="cuda") * 0.02, 4,
                                       QuantizationConfig("int4").group_for(I), torch.bfloat16)}
        ids = [torch.randperm(E + 2, device="cuda")[:EXPERTS_PER_TOKEN] for _ in range(8)]
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
        act = quant_gemv.gemv_launch(x, *stacks["gate_up"], ids[0], EXPERTS_PER_TOKEN, True)
        for stage, inp, per_id, silu in (("gate_up", x, EXPERTS_PER_TOKEN, True), ("down", act, 1, False)):
            q, s, z = stacks[stage]
            K = inp.shape[1]
            group = K // s.shape[-1]
            gemv = lambda i: lambda: quant_gemv.gemv_launch(inp, q, s, z, ids[i], per_id, silu)  # noqa: E731
            dense = rtn.dequantize(q[ids[0]], s[ids[0]], z[ids[0]], torch.float32)  # [pairs, N', K]
            products = torch.einsum("pnk,pk->pn", dense, inp.float()[torch.arange(len(ids[0]), device=inp.device) // per_id])
            if silu:
                gate, up = products.chunk(2, dim=-1)
                products = torch.nn.functional.silu(gate) * up
            row = dict(name=f"{variant} experts {stage}", pairs=len(ids[0]), K=K, group=group,
                       gemv_us=graph_us(gemv, len(ids)),
                       gemv_error=relative_error(gemv(0)(), products))
            compare(row, products, lambda i, epilogue, tile: lambda: mma_launch(inp, q, s, z, ids[i], per_id, silu,
                                                                                epilogue, *tile),
                    len(ids), tiles, K, group, row["name"])
            yield row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "base"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--only", choices=["experts", "projections"])
    parser.add_argument("--block-n", nargs="+", type=int, default=[64, 128], help="output rows per program")
    parser.add_argument("--block-k", nargs="+", type=int, default=[64, 128, 256], help="input columns per tile")
    parser.add_argument("--warps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--stages", nargs="+", type=int, default=[3])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int4_mma_probe.py needs a CUDA GPU")
    tiles = list(itertools.product(args.block_n, args.block_k, args.warps, args.stages))
    results = []
    parts = [] if args.only == "projections" else [experts(args.variants, tiles)]
    parts += [] if args.only == "experts" else [projections(args.variants, args.rows, tiles)]
    for part in parts:
        for row in part:
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
