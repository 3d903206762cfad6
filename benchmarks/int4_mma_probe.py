"""A candidate int4 kernel for decode steps of 1 to 16 token rows, through tensor cores, against the
int4 gemv in the tree (kernels/quant_gemv.py) and cuBLAS on bf16 weights. A probe: nothing in the
package calls it. Needs an sm_90 GPU (the bfloat16x2 subtraction in the inline PTX).

    python benchmarks/int4_mma_probe.py [--variants small base] [--rows 1 4 16] [--json out.json]

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

Compiled for sm_90 without a GPU (Triton 3.8), the loops take about 2.9-3.1 instructions per weight
at 128 x 128 tiles and 4 warps (SASS counts in RESULTS.md, seventeenth session); whether that makes
them faster needs this script. It prints each kernel's error against the float32 product of the
dequantized weights (and the gemv's, for scale), then microseconds per call inside CUDA graphs
(weights cycled past L2, as kernel_timing.graph_us does) for each tile tried.
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
from deepseek_vl2.quantization import rtn  # noqa: E402
from deepseek_vl2.quantization.config import QuantizationConfig  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402
from quant_gemv_configs import PROJECTIONS  # noqa: E402

TILES = list(itertools.product((64, 128), (64, 128, 256), (1, 4), (3,)))  # (BLOCK_N, BLOCK_K, warps, stages)

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
    def _int4_mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                         GROUP: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, 16)
        m_mask = offs_m[None, :] < M
        W: tl.constexpr = BLOCK_K // 8
        j = tl.arange(0, 2 * W)  # a tile's MMA column 2c + h: nibble i + 4h of word c, x column 8c + 4h + i
        x_cols = 8 * (j // 2) + 4 * (j % 2)
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            words = tl.load(q_ptr + offs_n[:, None] * stride_qn + (k0 // 8 + tl.arange(0, W))[None, :],
                            mask=n_mask[:, None], other=0)
            words2 = tl.reshape(tl.join(words, words), (BLOCK_N, 2 * W))
            s_offs = offs_n * stride_sn + k0 // GROUP
            x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + x_cols)[:, None]
            x0 = tl.load(x_ptrs, mask=m_mask, other=0.0)
            x1 = tl.load(x_ptrs + 1, mask=m_mask, other=0.0)
            x2 = tl.load(x_ptrs + 2, mask=m_mask, other=0.0)
            x3 = tl.load(x_ptrs + 3, mask=m_mask, other=0.0)
            if EPILOGUE:
                t = tl.dot(_raw_pairs(words2, 0), x0)
                t = tl.dot(_raw_pairs(words2, 1), x1, t)
                t = tl.dot(_raw_pairs(words2, 2), x2, t)
                t = tl.dot(_raw_pairs(words2, 3), x3, t)
                scale = tl.load(s_ptr + s_offs, mask=n_mask, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + s_offs, mask=n_mask, other=0.0).to(tl.float32)
                x_sum = tl.sum(x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32), axis=0)
                acc += t * scale[:, None] + (zero - 128.0 * scale)[:, None] * x_sum[None, :]
            else:
                s2 = tl.broadcast_to(tl.load(s_ptr + s_offs, mask=n_mask, other=0.0)[:, None], (BLOCK_N, 2 * W))
                z2 = tl.broadcast_to(tl.load(z_ptr + s_offs, mask=n_mask, other=0.0)[:, None], (BLOCK_N, 2 * W))
                acc = tl.dot(_scaled_pairs(words2, s2, z2, 0), x0, acc)
                acc = tl.dot(_scaled_pairs(words2, s2, z2, 1), x1, acc)
                acc = tl.dot(_scaled_pairs(words2, s2, z2, 2), x2, acc)
                acc = tl.dot(_scaled_pairs(words2, s2, z2, 3), x3, acc)
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask)


def mma_launch(x, qweight, scale, zero, epilogue: bool, block_n: int, block_k: int, warps: int, stages: int):
    """out [M, N] = x [M <= 16, K] @ W.T for W int4 [N, K] in rtn.quantize's layout."""
    M, K = x.shape
    N = qweight.shape[0]
    group = K // scale.shape[-1]
    if M > 16 or K % block_k or (group != block_k if epilogue else group % block_k):
        raise ValueError(f"M={M} K={K} group={group} BLOCK_K={block_k}: not this kernel's case")
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    words = qweight.view(torch.int32)
    _int4_mma_kernel[(triton.cdiv(N, block_n),)](
        x, words, scale, zero, out, M, N, K, x.stride(0), words.stride(0), scale.stride(0), out.stride(0),
        GROUP=group, EPILOGUE=epilogue, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return out


def fits(tile, K, group, epilogue) -> bool:
    _, block_k, _, _ = tile
    return K % block_k == 0 and (group == block_k if epilogue else group % block_k == 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "base"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int4_mma_probe.py needs a CUDA GPU")
    results = []
    for (name, (N, K)), rows in itertools.product(
            [(n, s) for n, s in PROJECTIONS.items() if n.split()[0] in args.variants], args.rows):
        group = QuantizationConfig("int4").group_for(K)
        dense = torch.randn(N, K, device="cuda") * 0.02
        q, s, z = rtn.quantize(dense, 4, group, torch.bfloat16)
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        exact = x.float() @ rtn.dequantize(q, s, z, torch.float32).T
        error = lambda out: ((out.float() - exact).norm() / exact.norm()).item()  # noqa: E731
        row = dict(name=name, N=N, K=K, group=group, rows=rows,
                   gemv_error=error(quant_gemv.gemv_launch(x, q, s, z, None, 1, False)))
        copies = copies_for(N * K // 2)
        weights = [rtn.quantize(torch.randn(N, K, device="cuda") * 0.02, 4, group, torch.bfloat16)
                   for _ in range(copies)]
        row["gemv_us"] = graph_us(lambda i: lambda: quant_gemv.gemv_launch(x, *weights[i], None, 1, False), copies)
        bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(N * K * 2))]
        row["cublas_bf16_us"] = graph_us(lambda i: lambda: torch.nn.functional.linear(x, bf16[i]), len(bf16))
        for epilogue in (False, True):
            kind = "epilogue" if epilogue else "pairs"
            tiles = [t for t in TILES if fits(t, K, group, epilogue)]
            if not tiles:
                continue
            row[f"{kind}_error"] = error(mma_launch(x, q, s, z, epilogue, *tiles[0]))
            timed = []
            for tile in tiles:
                try:
                    timed.append((graph_us(lambda i, t=tile: lambda: mma_launch(x, *weights[i], epilogue, *t), copies),
                                  tile))
                except Exception as failure:  # a tile that does not compile or launch (resources)
                    print(f"{name} rows={rows} {kind} {tile}: {type(failure).__name__}: {failure}"[:300], flush=True)
            if timed:
                row[f"{kind}_us"], row[f"{kind}_tile"] = min(timed)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
