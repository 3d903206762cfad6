"""Each Triton kernel of deepseek_vl2 against the PyTorch ops it replaces.

Used by the test files beside it (one per kernel module): on CUDA in bf16, and on the CPU through
Triton's interpreter (`interpreted(name)` runs `TRITON_INTERPRET=1 python kernel_checks.py NAME`;
the variable must be set before triton is imported, hence the separate process). The interpreter
has no bf16 tensor-core dots, so the CPU run uses float16.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from deepseek_vl2.kernels import (  # noqa: E402
    decode_attention,
    dispatch,
    gemv,
    moe_decode,
    moe_glue,
    norm_rope,
    quant_gemv,
    quant_grouped_gemm,
    router as router_kernel,  # noqa: E402
)
from deepseek_vl2.kernels.custom_ops import tl, triton  # noqa: E402
from deepseek_vl2.kernels.reference import (  # noqa: E402
    combine as _combine,
    rotary as apply_rotary,
    route as reference_route,  # noqa: E402
)
from deepseek_vl2.modeling.kv_cache import LayerCache  # noqa: E402
from deepseek_vl2.modeling.language_config import DeepseekV2Config  # noqa: E402
from deepseek_vl2.modeling.moe import Router  # noqa: E402
from deepseek_vl2.modeling.rms_norm import RMSNorm  # noqa: E402
from deepseek_vl2.quantization import rtn  # noqa: E402


def close(got, want, tol, what):
    got, want = got.float().cpu(), want.float().cpu()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max abs error {err:.3g} (scale {scale:.3g}, tol {tol})"


def expert_stacks(E, N, K, bits, group, down_group, device, dtype, g):
    """Random gate/up [E, 2N, K] and down [E, K, N] stacks quantized (rtn.py), each as (qweight, scale,
    zero or None) on `device` and its dequantized float32 weights."""
    stacks = []
    for shape, columns in (((E, 2 * N, K), group), ((E, K, N), down_group)):
        q, s, z = (t.to(device) if t is not None else None
                   for t in rtn.quantize(torch.randn(*shape, generator=g) * 0.1, bits, columns, dtype))
        stacks.append((q, s, z, rtn.dequantize(q, s, z, torch.float32)))
    return stacks


def check_gemv(device, dtype, tol):
    g = torch.Generator().manual_seed(1)
    E, N, K = 5, 48, 80
    x = torch.randn(2, K, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * N, K, generator=g) * 0.1).to(device, dtype)
    w2 = (torch.randn(E, K, N, generator=g) * 0.1).to(device, dtype)
    ids = torch.tensor([3, 0, 4, 1, 1, 2], device=device)  # 3 experts for each of 2 rows
    act = gemv.gemv(x, w13, ids, 3, True)
    rows = x.repeat_interleave(3, dim=0)
    gate_up = torch.einsum("ak,ank->an", rows.float(), w13[ids].float()).to(dtype)
    want_act = F.silu(gate_up[:, :N]) * gate_up[:, N:]
    close(act, want_act, tol, "expert gemv with silu_mul")
    out = gemv.gemv(act, w2, ids, 1, False)
    close(out, torch.einsum("an,akn->ak", act.float(), w2[ids].float()), tol, "expert gemv")
    plain = gemv.gemv(x, w2[0].T.contiguous(), None, 1, False, True)
    assert plain.dtype == torch.float32
    close(plain, x.float() @ w2[0].float(), tol, "plain gemv with float32 output")


def check_moe_decode(device, dtype, tol):
    """The expert GEMM pair (gate/up with silu_mul, then down) against einsum products, for rows whose
    pairs leave experts unchosen, give one expert more pairs than a dot block (the shared expert of
    20 and 37 rows: its blocks split over programs) and leave partial output and K tiles; the pairs'
    outputs come back in their own order."""
    g = torch.Generator().manual_seed(11)
    E, N, K, k = 7, 40, 80, 3
    for rows in (3, 20, 37):
        x = torch.randn(rows, K, generator=g).to(device, dtype)
        w13 = (torch.randn(E, 2 * N, K, generator=g) * 0.1).to(device, dtype)
        w2 = (torch.randn(E, K, N, generator=g) * 0.1).to(device, dtype)
        routed = torch.stack([torch.randperm(E - 2, generator=g)[:k - 1] for _ in range(rows)])
        ids = torch.cat((routed, torch.full((rows, 1), E - 1)), dim=1).to(device)  # [rows, k]; expert E-2: none
        flat = ids.flatten()
        for tiles in ((None, None, None, None), (32, 32, 2, 1)):
            act = moe_decode.expert_gemm_launch(x, w13, ids, k, True, *tiles)
            gate_up = torch.einsum("ak,ank->an", x.repeat_interleave(k, dim=0).float(), w13[flat].float()).to(dtype)
            close(act, F.silu(gate_up[:, :N]) * gate_up[:, N:], tol, f"{rows} rows, gate/up with silu_mul, {tiles}")
            out = moe_decode.expert_gemm_launch(act, w2, ids, 1, False, *tiles)
            close(out, torch.einsum("an,akn->ak", act.float(), w2[flat].float()), tol, f"{rows} rows, down, {tiles}")
    assert torch.equal(moe_decode.expert_gemm(act, w2, ids, 1, False), moe_decode.expert_gemm_launch(act, w2, ids, 1, False))


def check_quant_moe_decode(device, dtype, tol):
    """The quantized expert GEMM pair (gate/up with silu_mul, then down) on int8 and int4 stacks
    against einsum products with the PyTorch-dequantized weights, for rows whose pairs leave an
    expert unchosen and give one more pairs than a dot block (the shared expert of 20 and 37 rows: its
    blocks split over programs), at shapes the tiles do not divide (masked loads) and one they do;
    outputs in the pairs' own order."""
    g = torch.Generator().manual_seed(12)
    E, k = 7, 3
    for rows, N, K in ((3, 96, 96), (20, 64, 128), (37, 32, 64)):
        x = torch.randn(rows, K, generator=g).to(device, dtype)
        routed = torch.stack([torch.randperm(E - 2, generator=g)[:k - 1] for _ in range(rows)])
        ids = torch.cat((routed, torch.full((rows, 1), E - 1)), dim=1).to(device)  # [rows, k]; expert E-2: none
        for bits, group in ((8, K), (4, 32)):
            (q13, s13, z13, d13), (q2, s2, z2, d2) = expert_stacks(E, N, K, bits, group, N if bits == 8 else 32,
                                                                   device, dtype, g)
            for tiles in ((None, None, None, None), (32, 32, 4, 1)):  # (int4: one group a tile either way)
                what = f"int{bits}, {rows} rows, N={N} K={K}, tiles {tiles}"
                act = moe_decode.quant_expert_gemm_launch(x, q13, s13, z13, ids, k, True, *tiles)
                flat = ids.flatten()
                gate_up = torch.einsum("ak,ank->an", x.repeat_interleave(k, dim=0).float(), d13[flat]).to(dtype)
                close(act, F.silu(gate_up[:, :N]) * gate_up[:, N:], tol, f"{what}: gate/up with silu_mul")
                out = moe_decode.quant_expert_gemm_launch(act, q2, s2, z2, ids, 1, False, *tiles)
                close(out, torch.einsum("an,akn->ak", act.float(), d2[flat]), tol, f"{what}: down")
            assert torch.equal(moe_decode.quant_expert_gemm(act, q2, s2, z2, ids, 1, False),
                               moe_decode.quant_expert_gemm_launch(act, q2, s2, z2, ids, 1, False))


def check_quant_gemv(device, dtype, tol):
    """Expert (with silu_mul) and plain gemv on int8 and int4 weights against einsum products with the
    PyTorch-dequantized weights, at shapes that leave partial output blocks, partial K tiles and (int4)
    groups smaller and larger than a tile."""
    g = torch.Generator().manual_seed(7)
    E, N, K = 4, 20, 320  # int4 groups of 64 and 32; the default tile (512 columns) is past K
    x = torch.randn(2, K, generator=g).to(device, dtype)
    ids = torch.tensor([3, 0, 1, 1], device=device)  # 2 experts for each of 2 rows
    rows = x.repeat_interleave(2, dim=0)
    for bits, group in ((8, K), (4, 64), (4, 32)):
        (q13, s13, z13, d13), (q2, s2, z2, d2) = expert_stacks(E, N, K, bits, group, N if bits == 8 else 4, device,
                                                               dtype, g)
        # the default tiles, 64-column tiles (1 or 2 int4 groups), those loaded 3 or 4 stages ahead (word
        # tiles), 16 output rows of one warp, and one output row per program of 4 warps
        for tiles in ((None, None, None, 1), (4, 64, 2, 1), (4, 64, 2, 3), (8, 64, 1, 4), (16, 128, 1, 4),
                      (1, 256, 4, 1)):
            act = quant_gemv.gemv_launch(x, q13, s13, z13, ids, 2, True, *tiles)
            gate_up = torch.einsum("ak,ank->an", rows.float(), d13[ids]).to(dtype)
            want = F.silu(gate_up[:, :N]) * gate_up[:, N:]
            close(act, want, tol, f"int{bits} expert gemv with silu_mul, group {group}, tiles {tiles}")
            # one output row a program is 1280 programs for the four rows' down (about 20 s each in the
            # interpreter): its first row alone there
            down = slice(None) if tiles[0] != 1 else slice(0, 1)
            out = quant_gemv.gemv_launch(act[down], q2, s2, z2, ids[down], 1, False, *tiles)
            close(out, torch.einsum("an,akn->ak", act[down].float(), d2[ids[down]]), tol,
                  f"int{bits} expert gemv, tiles {tiles}")
            plain = quant_gemv.gemv_launch(x, q13[1], s13[1], z13[1] if z13 is not None else None, None, 1, False,
                                           *tiles)
            close(plain, x.float() @ d13[1].T, tol, f"int{bits} plain gemv, tiles {tiles}")
            one = quant_gemv.gemv_launch(x[:1], q13[1], s13[1], z13[1] if z13 is not None else None, None, 1, False,
                                         *tiles)  # one row: gemv_tiles' pipelined projection tiles by default
            close(one, x[:1].float() @ d13[1].T, tol, f"int{bits} plain gemv of one row, tiles {tiles}")
        assert torch.equal(quant_gemv.gemv(x, q13[1], s13[1], z13[1] if z13 is not None else None, None, 1, False),
                           quant_gemv.gemv_launch(x, q13[1], s13[1], z13[1] if z13 is not None else None, None, 1,
                                                  False))
    # int4 word products are float16 sums of x / (16 chain) (and x / (256 chain)): in range at activations in the
    # tens of thousands, one word a sum (a projection) or 4 (the experts' tiles)
    q, s, z = (t.to(device) for t in rtn.quantize(torch.randn(N, K, generator=g) * 0.1, 4, 64, dtype))
    large = x * 5000  # |x| up to about 2e4: a half's 4 products (q - 8) * x would pass 65504 without the 1 / 16
    close(quant_gemv.gemv_launch(large, q, s, z, None, 1, False),
          large.float() @ rtn.dequantize(q, s, z, torch.float32).T, tol, "int4 plain gemv, activations of about 1e4")
    q, s, z = (t.to(device) for t in rtn.quantize(torch.randn(E, N, K, generator=g) * 1e-3, 4, 64, dtype))
    assert quant_gemv.word_chain(True, 64, *quant_gemv.gemv_tiles(True, True, True, False, N, K, 4, 64)[:3]) == 4
    # x's first row at 2e4 with the sign of q - 8 in its first expert's first output row: that row's float16 sums of
    # 16 products would pass 65504 without the chain's 1 / 4
    w = rtn.dequantize(q, s, z, torch.float32)
    middle = (z.float() + 8 * s.float()).repeat_interleave(64, dim=-1)
    aligned = torch.where(w[ids[0], 0] >= middle[ids[0], 0], 2e4, -2e4).to(dtype)
    large = torch.stack((aligned, large[1]))
    close(quant_gemv.gemv_launch(large, q, s, z, ids, 2, False),
          torch.einsum("ak,ank->an", large.repeat_interleave(2, dim=0).float(), w[ids]), tol,
          "int4 expert gemv (4 words a float16 sum), activations of 2e4 aligned with the weights")
    # int8 rows that are not whole 32-bit words (4k + 2 columns) take the byte tiles
    q, s, _ = (t.to(device) if t is not None else None
               for t in rtn.quantize(torch.randn(2 * N, K - 2, generator=g) * 0.1, 8, K - 2, dtype))
    close(quant_gemv.gemv_launch(x[:, :K - 2], q, s, None, None, 1, False),
          x[:, :K - 2].float() @ rtn.dequantize(q, s, None, torch.float32).T, tol, "int8 plain gemv, byte tiles")


def _x_pairs_reference(act: torch.Tensor, chain: int) -> torch.Tensor:
    """What quant_gemv's x pairs hold for activations `act` [rows, K]: per word of 8 columns c, the
    float16 pairs (x0, x4) / (16 chain), (x1, x5) / (256 chain), (x2, x6) / (16 chain), (x3, x7) /
    (256 chain) (low half first) and the float32 bits of ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 +
    x7)), as planes: int32 [rows, 5, K / 8]."""
    v = act.float().view(act.shape[0], -1, 8)
    low, high = 1.0 / (16 * chain), 1.0 / (256 * chain)

    def pair(first, second):
        return (first.half().view(torch.int16).int() & 0xFFFF) | (second.half().view(torch.int16).int() << 16)

    total = ((v[..., 0] + v[..., 1]) + (v[..., 2] + v[..., 3])) + ((v[..., 4] + v[..., 5]) + (v[..., 6] + v[..., 7]))
    return torch.stack((pair(v[..., 0] * low, v[..., 4] * low), pair(v[..., 1] * high, v[..., 5] * high),
                        pair(v[..., 2] * low, v[..., 6] * low), pair(v[..., 3] * high, v[..., 7] * high),
                        total.view(torch.int32)), dim=1)


def check_quant_gemv_pairs(device, dtype, tol):
    """The int4 expert gate/up gemv reading its x as x pairs, and writing its silu_mul output as the down
    gemv's x pairs (plain and routing), one token's pairs at the default tiles: the pairs as a PyTorch reference makes them from
    the activations the gemv writes otherwise, and the down from them equal to the down from those
    activations, to the bit; at an intermediate size the down's 128-column tiles divide and one they do
    not. Pairs for another chain than the down's tile sums are refused; a down of 256-column tiles
    takes plain activations."""
    g = torch.Generator().manual_seed(9)
    E, k = 5, 3
    assert quant_gemv.act_pairs_chain(256, 512, 32, 32, k) == 0  # the down in 256-column tiles
    for N, K in ((64, 160), (128, 256)):  # (intermediate, hidden): the down's K tiles masked, then whole
        x = torch.randn(1, K, generator=g).to(device, dtype)
        ids = torch.tensor([4, 0, 2], device=device)
        (q13, s13, z13, _), (q2, s2, z2, _) = expert_stacks(E, N, K, 4, 32, 32, device, dtype, g)
        chain = quant_gemv.act_pairs_chain(K, N, 32, 32, k)
        assert chain == 4, chain
        act = quant_gemv.gemv(x, q13, s13, z13, ids, k, True)
        x_chain = quant_gemv.gate_up_pairs_chain(K, N, 32, k)
        x_pairs = _x_pairs_reference(x.cpu(), x_chain).to(device)  # the gate/up reading its x as pairs
        assert torch.equal(quant_gemv.gemv(x_pairs, q13, s13, z13, ids, k, True, x_chain=x_chain, out_dtype=dtype), act)
        pairs = quant_gemv.gemv(x, q13, s13, z13, ids, k, True, pairs_chain=chain)
        assert pairs.shape == (k, 5, N // 8) and pairs.dtype == torch.int32
        assert torch.equal(pairs.cpu(), _x_pairs_reference(act.cpu(), chain)), f"x pairs of {N} activations"
        down = quant_gemv.gemv(pairs, q2, s2, z2, ids, 1, False, x_chain=chain, out_dtype=dtype)
        assert down.dtype == dtype
        assert torch.equal(down, quant_gemv.gemv(act, q2, s2, z2, ids, 1, False)), f"down from pairs, hidden {K}"
        try:
            quant_gemv.gemv(pairs, q2, s2, z2, ids, 1, False, x_chain=1, out_dtype=dtype)
            raise AssertionError("pairs of another chain accepted")
        except ValueError as error:
            assert "chains of 1 words" in str(error), error
    router = _router("softmax", "greedy", False, K, dtype, experts=E - 1, top_k=2)
    logits = _logits(x, router.weight.to(device, dtype))
    routing = (logits, None, 2, k, False, True, 1.0)
    act, ids, weights = quant_gemv.routed_gate_up(x, q13, s13, z13, *routing)
    pairs, pair_ids, pair_weights = quant_gemv.routed_gate_up(x, q13, s13, z13, *routing, chain)
    assert torch.equal(pair_ids, ids) and torch.equal(pair_weights, weights)
    assert torch.equal(pairs.cpu(), _x_pairs_reference(act.cpu(), chain)), "x pairs of routed activations"


def check_dequantize(device, dtype, tol):
    g = torch.Generator().manual_seed(8)
    for bits, shape, group in ((8, (3, 40, 300), 300), (4, (3, 40, 320), 64), (4, (37, 96), 32)):
        q, s, z = (t.to(device) if t is not None else None
                   for t in rtn.quantize(torch.randn(*shape, generator=g), bits, group, dtype))
        got = quant_gemv.dequantize(q, s, z, dtype)
        assert got.shape == shape and got.dtype == dtype
        close(got, rtn.dequantize(q, s, z, dtype), tol, f"int{bits} dequantize {shape}")


if triton is not None:
    @triton.jit
    def _row_blocks_kernel(ends_ptr, E, out_ptr, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr):
        """quant_grouped_gemm.row_block of each program, stored as (expert, row0, row_end) triples."""
        block = tl.program_id(0)
        expert, row0, row_end = quant_grouped_gemm.row_block(ends_ptr, E, block, BLOCK_M, EXPERTS)
        tl.store(out_ptr + 3 * block, expert)
        tl.store(out_ptr + 3 * block + 1, row0)
        tl.store(out_ptr + 3 * block + 2, row_end)


def check_quant_grouped_gemm(device, dtype, tol):
    """Rows sorted by expert (one expert without rows, one with more rows than a block) times their
    int8 / int4 experts against per-expert products with the PyTorch-dequantized weights; a shape the
    tiles do not divide (masked loads) and one they do (unmasked)."""
    g = torch.Generator().manual_seed(9)
    E = 5
    counts = torch.tensor([3, 0, 21, 1, 12])
    ends = counts.cumsum(0).to(torch.int32)
    # 16-row blocks: 1 + 0 + 2 + 1 + 1 = 5 of the grid's cdiv(37, 16) + 5 = 8 programs, each (expert, first
    # row, the expert's end row); the rest empty (end = first)
    blocks = torch.zeros(8, 3, dtype=torch.int32, device=device)
    _row_blocks_kernel[(8,)](ends.to(device), E, blocks, BLOCK_M=16, EXPERTS=8)
    assert blocks.tolist() == [[0, 0, 3], [2, 3, 24], [2, 19, 24], [3, 24, 25], [4, 25, 37], [4, 41, 41],
                               [4, 57, 57], [4, 73, 73]], blocks.tolist()
    for N, K in ((40, 96), (256, 256)):  # the second divides every default tile: int8 rows first takes 256 outputs
        rows = torch.randn(int(counts.sum()), K, generator=g).to(device, dtype)
        for bits, group in ((8, K), (4, 32)):
            q, s, z = (t.to(device) if t is not None else None
                       for t in rtn.quantize(torch.randn(E, N, K, generator=g) * 0.1, bits, group, dtype))
            dense = rtn.dequantize(q, s, z, dtype).float()
            want = torch.cat([rows[start:end].float() @ dense[e].T
                              for e, (start, end) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist()))])
            for block_m in (16, 64):  # weight tile first (few rows an expert), rows first
                close(quant_grouped_gemm.grouped_gemm(rows, q, s, z, ends.to(device), block_m), want, tol,
                      f"int{bits} grouped gemm, {block_m}-row blocks, N={N} K={K}")
            got = quant_grouped_gemm.grouped_gemm_launch(rows, q, s, z, ends.to(device), 16, 16, 32, 2, 1)
            close(got, want, tol, f"int{bits} grouped gemm, 16 x 16 tiles, N={N} K={K}")
            # one weight for every row (a linear layer), 37 rows: three 16-row programs, the last part empty
            x = rows[:37]
            close(quant_grouped_gemm.dense_gemm(x, q[2], s[2], z[2] if z is not None else None), x.float() @ dense[2].T,
                  tol, f"int{bits} dense gemm, default tiles, N={N} K={K}")
            close(quant_grouped_gemm.dense_gemm(x, q[2], s[2], z[2] if z is not None else None, 64),
                  x.float() @ dense[2].T, tol, f"int{bits} dense gemm, 64-row programs rows first, N={N} K={K}")
            for block_n in (16, 64):  # int8 tiles 32 columns wide here
                got = quant_grouped_gemm.grouped_gemm_launch(x, q[2], s[2], z[2] if z is not None else None, None, 16,
                                                             block_n, 32, 2, 1)
                close(got, x.float() @ dense[2].T, tol, f"int{bits} dense gemm, {block_n} outputs a tile, N={N} K={K}")
    # 37 pairs over 5 experts is a decode batch's few rows an expert; 80 is not
    assert quant_grouped_gemm.block_rows(True, 37, 5) == quant_grouped_gemm.block_rows(False, 79, 5) == 16
    assert (quant_grouped_gemm.block_rows(True, 80, 5), quant_grouped_gemm.block_rows(False, 80, 5)) == (128, 64)
    # linear layers' output tiles by width
    assert [quant_grouped_gemm.dense_tiles(True, N)[0] for N in (3648, 6720, 21888)] == [16, 32, 64]
    assert [quant_grouped_gemm.dense_tiles(False, N)[:2] for N in (2048, 3648)] == [(16, 256), (32, 256)]


def check_route(device, dtype, tol):
    """The route kernel from the router's float32 logits against reference.route on the same logits'
    inputs (greedy softmax; noaux_tc's sigmoid with a correction bias), always-on experts after the top k."""
    torch.manual_seed(2)
    for scoring, method, bias, hidden in (("softmax", "greedy", False, 2100), ("sigmoid", "noaux_tc", True, 64)):
        router = _router(scoring, method, bias, hidden, dtype)
        x = torch.randn(6 if method == "greedy" else 70, hidden).to(dtype)
        with torch.no_grad():
            want_ids, want_w = reference_route(x.float(), router.weight, router.correction_bias, router.routing, 2)
        bias_t = router.correction_bias.to(device) if bias else None
        ids, w = router_kernel.route(_logits(x.to(device), router.weight.to(device, dtype)), bias_t, 3,
                                     scoring == "sigmoid", True, 2.5, 2)
        assert ids.shape == (len(x), 5) and (ids[:, 3:].cpu() == torch.tensor([16, 17])).all()
        order, want_order = ids.cpu().argsort(dim=1), want_ids.argsort(dim=1)
        assert torch.equal(ids.cpu().gather(1, order), want_ids.gather(1, want_order)), f"{method} experts"
        close(w.cpu().gather(1, order), want_w.gather(1, want_order), tol, f"{method} weights")


def check_routed_gate_up(device, dtype, tol):
    """The quantized expert gate/up gemv whose programs route (quant_gemv.routed_gate_up, int8 and
    int4 stacks) against the route kernel and the gate/up gemv with its ids: the same ids, weights
    and activations to the bit, for greedy softmax routing (with and without renormalisation) and
    noaux_tc's sigmoid with a correction bias, at one token and at three."""
    torch.manual_seed(3)
    hidden, inter, E, k, shared = 256, 32, 16, 3, 2
    g = torch.Generator().manual_seed(4)
    stacks = {}
    for bits, group in ((8, hidden), (4, 64)):
        stacks[f"int{bits}"] = tuple(t.to(device) if t is not None else None for t in rtn.quantize(
            torch.randn(E + shared, 2 * inter, hidden, generator=g) * 0.1, bits, group, dtype))
    for scoring, method, bias, normalize in (("softmax", "greedy", False, True), ("sigmoid", "noaux_tc", True, True),
                                             ("softmax", "greedy", False, False)):
        router = _router(scoring, method, bias, hidden, dtype, experts=E, top_k=k)
        bias_t = router.correction_bias.to(device) if bias else None
        for tokens in (1, 3):
            x = torch.randn(tokens, hidden).to(device, dtype)
            logits = _logits(x, router.weight.to(device, dtype))
            routing = (logits, bias_t, k, k + shared, scoring == "sigmoid", normalize, 2.5)
            want_ids, want_w = router_kernel.route(logits, bias_t, k, scoring == "sigmoid", normalize, 2.5, shared)
            for name, stack in stacks.items():
                what = f"{name}, {method}, normalize {normalize}, {tokens} tokens"
                act, ids, w = quant_gemv.routed_gate_up(x, *stack, *routing)
                want_act = quant_gemv.gemv(x, *stack, want_ids.flatten(), k + shared, True)
                assert torch.equal(ids, want_ids), f"{what}: ids {ids.tolist()} against {want_ids.tolist()}"
                assert torch.equal(w, want_w), f"{what}: weights"
                assert torch.equal(act, want_act), f"{what}: activations"


def check_add_norm_logits(device, dtype, tol):
    """router.add_norm_logits: the residual sum exactly as the activations' add, the norm exactly as
    norm_rope.rms_norm gives it, and the logits against the float32 product of that norm, for a hidden
    size that is not a power of two (x a strided view) and expert counts that 8 does not divide;
    add_norm_logits_pairs the same, and the norm as x pairs (hidden sizes of whole words of 8)."""
    g = torch.Generator().manual_seed(7)
    for tokens, hidden, experts in ((1, 2100, 70), (3, 64, 16), (1, 1160, 20)):
        norm = RMSNorm(hidden, eps=1e-6)
        torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=g)
        x = torch.randn(tokens, hidden + 8, generator=g).to(device, dtype)[:, 8:]
        delta = torch.randn(tokens, hidden, generator=g).to(device, dtype)
        weight = (torch.randn(experts, hidden, generator=g) * 0.05).to(device, dtype)
        total, normed, logits = router_kernel.add_norm_logits(x, delta, norm.weight.to(device, dtype), 1e-6, weight)
        want_total = (x.cpu() + delta.cpu()).to(dtype)
        assert torch.equal(total.cpu(), want_total), f"sum: {(total.cpu() != want_total).sum()} elements differ"
        assert torch.equal(normed, norm_rope.rms_norm(total, norm.weight.to(device, dtype), 1e-6)), "norm"
        with torch.no_grad():
            close(normed.cpu(), norm.to(dtype)(want_total), tol, "norm against the formula")
        assert logits.dtype == torch.float32 and logits.shape == (tokens, experts)
        close(logits.cpu(), normed.cpu().float() @ weight.cpu().float().T, 1e-4, "logits")
        if hidden % 8 == 0:  # the norm also as x pairs for an int4 gemv of chains of 4 words
            *rest, pairs = router_kernel.add_norm_logits_pairs(x, delta, norm.weight.to(device, dtype), 1e-6, weight, 4)
            for got, want in zip(rest, (total, normed, logits)):
                assert torch.equal(got, want)
            assert torch.equal(pairs.cpu(), _x_pairs_reference(normed.cpu(), 4)), "the norm's x pairs"


def _router(scoring, method, bias, hidden, dtype, experts=16, top_k=3):
    """A Router with random weights (rounded to `dtype`, so both sides see the same) and bias."""
    config = DeepseekV2Config(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=top_k,
                              topk_method=method, scoring_func=scoring, norm_topk_prob=True, routed_scaling_factor=2.5,
                              n_group=1, topk_group=1)
    router = Router(config).eval()
    torch.nn.init.normal_(router.weight, std=0.3)
    router.weight.data = router.weight.data.to(dtype).float()
    if bias:
        torch.nn.init.normal_(router.e_score_correction_bias, std=0.1)
    return router


def _logits(x, weight):
    """The router's float32 logits as dispatch takes them: by gemv for a few tokens, else a float32 GEMM."""
    if len(x) <= dispatch.MAX_ROUTER_GEMV_TOKENS:
        return gemv.gemv(x, weight, None, 1, False, True)
    return x.float() @ weight.float().T


def check_mha_decode(device, dtype, tol):
    g = torch.Generator().manual_seed(3)
    for B, H, kv_heads, L, D in ((1, 10, 10, 300, 128), (3, 4, 2, 77, 64)):
        cache = torch.randn(B, 2, kv_heads, L + 40, D, generator=g).to(device, dtype)
        q = torch.randn(B, H, D, generator=g).to(device, dtype)
        mask = torch.zeros(B, L)
        mask[0, :5] = torch.finfo(dtype).min  # a padded row
        mask = mask.to(device, dtype)
        keys_values = cache[:, :, :, :L]  # a strided view, as the cache is read
        k = keys_values[:, 0].repeat_interleave(H // kv_heads, 1).float()
        v = keys_values[:, 1].repeat_interleave(H // kv_heads, 1).float()
        for rows in (mask, mask[:1]):  # per-row mask, and one mask row for the whole batch
            want = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=rows.float()[:, None, None])
            close(decode_attention.mha_decode(q, keys_values, rows, D**-0.5), want[:, :, 0], tol, f"mha_decode B={B}")
            close(decode_attention.mha_decode(q, keys_values, rows, D**-0.5, tiles=(16, 264, 2, 4)), want[:, :, 0],
                  tol, f"mha_decode B={B}, tiles given")


def check_mla_decode(device, dtype, tol):
    g = torch.Generator().manual_seed(4)
    R, P = 64, 16
    # both tile rules (up to 4 rows / more), several key slices a row and a last slice cut short; one row of 16
    # and of 32 heads (the combine's own value columns for each)
    for B, H, L in ((2, 16, 150), (1, 32, 700), (1, 16, 200), (6, 16, 300)):
        cache = torch.randn(B, L + 30, R + P, generator=g).to(device, dtype)
        q_latent = torch.randn(B, H, R, generator=g).to(device, dtype)
        q_pe = torch.randn(B, H, P, generator=g).to(device, dtype)
        mask = torch.zeros(B, L)
        mask[-1, :7] = torch.finfo(dtype).min  # a padded row
        mask = mask.to(device, dtype)
        latent = cache[:, :L]
        scale = (R + P) ** -0.5
        scores = torch.einsum("bhr,bnr->bhn", torch.cat((q_latent, q_pe), -1).float(), latent.float()) * scale
        probs = (scores + mask.float()[:, None]).softmax(-1)
        want = torch.einsum("bhn,bnr->bhr", probs, latent[..., :R].float())
        close(decode_attention.mla_decode(q_latent, q_pe, latent, mask, scale), want, tol, f"mla_decode B={B}")
        close(decode_attention.mla_decode(q_latent, q_pe, latent, mask, scale, tiles=(16, 132, 2, 2, 16)), want, tol,
              f"mla_decode B={B}, tiles given")
        kv_b = torch.randn(H * (16 + 64), R, generator=g).to(device, dtype)  # W_UK rows (16), then W_UV's (64)
        w_uv = kv_b.view(H, 16 + 64, R)[:, 16:]  # a strided view, as dispatch takes it
        # the combine rounds the latent output to the activation dtype before the product
        values = torch.einsum("bhr,hvr->bhv", want.to(dtype).float(), w_uv.float())
        close(decode_attention.mla_decode(q_latent, q_pe, latent, mask, scale, w_uv=w_uv), values, tol,
              f"mla_decode B={B}, W_UV in the combine")
        one_row = (scores + mask[:1].float()[:, None]).softmax(-1)  # one mask row for the whole batch
        close(decode_attention.mla_decode(q_latent, q_pe, latent, mask[:1], scale),
              torch.einsum("bhn,bnr->bhr", one_row, latent[..., :R].float()), tol, f"mla_decode B={B}, one mask row")


def check_moe_glue(device, dtype, tol):
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(37, 2 * 96, generator=g).to(device, dtype)
    want = F.silu(gate_up[:, :96]) * gate_up[:, 96:]
    close(moe_glue.silu_mul(gate_up), want, tol, "silu_mul")
    N, k, h = 9, 4, 200
    ids = torch.randint(0, 5, (N, k), generator=g)
    order = ids.flatten().argsort(stable=True)
    outputs = torch.randn(N * k, h, generator=g).to(device, dtype)
    weights = torch.rand(N, k, generator=g).to(device)
    slots = torch.empty_like(order)
    slots[order] = torch.arange(N * k)
    unsorted = torch.empty_like(outputs)
    unsorted[order.to(device)] = outputs
    close(moe_glue.combine_sorted(outputs, slots.to(device), weights), _combine(unsorted, weights), tol,
          "combine_sorted")
    close(moe_glue.combine_pairs(unsorted, weights), _combine(unsorted, weights), tol, "combine_pairs")
    assert moe_glue.silu_mul(gate_up[:0]).shape == (0, 96)


def check_norm_rope(device, dtype, tol):
    g = torch.Generator().manual_seed(6)
    norm = RMSNorm(80, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=g)
    wide = torch.randn(2, 3, 96, generator=g).to(dtype)
    rows = wide[..., :80]  # a strided view, as MLA normalises part of a projection
    with torch.no_grad():
        want = norm.to(dtype)(rows)  # the PyTorch formula (CPU)
        got = norm_rope.rms_norm(rows.to(device), norm.weight.to(device), 1e-5)
    close(got, want, tol, "rms_norm")
    if device == "cuda":  # with recording autograd the PyTorch formulas run on CUDA too: same bits
        with torch.enable_grad():
            formula = norm.to(device)(rows.to(device)).detach()
        assert torch.equal(got, formula), f"rms_norm: {(got != formula).sum()} elements differ from PyTorch's"
    B, H, S, D = 2, 3, 5, 64
    cos = torch.randn(B, S, D, generator=g).to(dtype)
    sin = torch.randn(B, S, D, generator=g).to(dtype)
    full = torch.randn(B, S, H, D + 16, generator=g).to(dtype)
    x = full[..., 16:].transpose(1, 2)  # [B, H, S, D] with the strides of a head split
    for interleaved in (False, True):
        with torch.no_grad():
            want = apply_rotary(x, cos, sin, interleaved)  # CPU: the PyTorch formula
            got = norm_rope.rotary(x.to(device), cos.to(device), sin.to(device), interleaved)
        close(got, want, tol, f"rotary interleaved={interleaved}")
        if device == "cuda":
            with torch.enable_grad():
                formula = apply_rotary(x.to(device), cos.to(device), sin.to(device), interleaved)
            assert torch.equal(got, formula), f"rotary: {(got != formula).sum()} elements differ from PyTorch's"
    one_row = norm_rope.rotary(x.to(device), cos[:1].to(device), sin[:1].to(device), False)
    close(one_row, apply_rotary(x, cos[:1].expand(B, S, D), sin[:1].expand(B, S, D)), tol, "rotary, one table row")


def check_mla_new_tokens(device, dtype, tol):
    """The query's rotation and each token's cache entry (normalised latent, rotated rope key) written
    at its slot, against the formulas and LayerCache.write: slots shared by the rows ([S]) and each
    row's own ([B, S]), heads not a power of two, strided views of one projection, one table row;
    then mla_new_tokens_absorbed, whose absorbed query is checked against a float32 einsum."""
    g = torch.Generator().manual_seed(8)
    B, S, H, nope, P, R, capacity = 2, 3, 5, 16, 16, 64, 10
    projected = torch.randn(B, S, H * (nope + P) + R + P, generator=g).to(dtype)
    q, c_kv, k_pe = projected.split((H * (nope + P), R, P), dim=-1)
    q_pe = q.view(B, S, H, nope + P).transpose(1, 2)[..., nope:]  # [B, H, S, P] as MLA splits it
    norm = RMSNorm(R, eps=1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=g)
    norm = norm.to(dtype)
    cos, sin = (torch.randn(B, S, P, generator=g).to(dtype) for _ in range(2))
    before = torch.randn(B, capacity, R + P, generator=g).to(dtype)
    for positions, table in ((torch.tensor([4, 7, 2]), B), (torch.tensor([[0, 5, 9], [3, 1, 8]]), 1)):
        c, s = cos[:table], sin[:table]
        with torch.no_grad():
            want_q, want_cache = _new_tokens_formulas(q_pe, c_kv, k_pe, c.expand(B, S, P), s.expand(B, S, P), norm,
                                                      before, positions)
            cache = before.to(device, copy=True)  # on the CPU too: `before` stays as it was
            got_q = norm_rope.mla_new_tokens(q_pe.to(device), c_kv.to(device), k_pe.to(device), c.to(device),
                                             s.to(device), norm.weight.to(device), 1e-6, cache, positions.to(device))
        what = f"mla_new_tokens, positions {tuple(positions.shape)}"
        close(got_q, want_q, tol, what + ": query")
        close(cache, want_cache, tol, what + ": cache")
        untouched = want_cache == before
        assert torch.equal(cache.cpu()[untouched], before[untouched]), what + ": slots not written changed"
        if device == "cuda":  # with recording autograd the PyTorch formulas run on CUDA too: same rotations
            with torch.enable_grad():
                formula_q = apply_rotary(q_pe.to(device), c.to(device).expand(B, S, P), s.to(device).expand(B, S, P),
                                         True)
            assert torch.equal(got_q, formula_q), f"{what}: {(got_q != formula_q).sum()} query values differ"
            rows = torch.arange(B)[:, None]
            slots = positions.expand(B, S)
            assert torch.equal(cache.cpu()[rows, slots, R:], want_cache[rows, slots, R:]), what + ": rope keys differ"
    # with the query's no-rope part absorbed through W_UK [H, nope, R] (a view of kv_b's rows) too
    kv_b = (torch.randn(H * (nope + 8), R, generator=g) * 0.3).to(dtype)
    w_uk = kv_b.view(H, nope + 8, R)[:, :nope]
    q_nope = q.view(B, S, H, nope + P).transpose(1, 2)[..., :nope]
    positions = torch.tensor([4, 7, 2])
    with torch.no_grad():
        cache = before.to(device, copy=True)  # on the CPU too: `before` stays as it was
        got_q, absorbed = norm_rope.mla_new_tokens_absorbed(
            q_pe.to(device), c_kv.to(device), k_pe.to(device), cos.to(device), sin.to(device),
            norm.weight.to(device), 1e-6, cache, positions.to(device), q_nope.to(device), w_uk.to(device))
        want_q, want_cache = _new_tokens_formulas(q_pe, c_kv, k_pe, cos, sin, norm, before, positions)
    close(got_q, want_q, tol, "mla_new_tokens_absorbed: query")
    close(cache, want_cache, tol, "mla_new_tokens_absorbed: cache")
    close(absorbed, torch.einsum("bhsn,hnr->bhsr", q_nope.float(), w_uk.float()), tol, "mla_new_tokens_absorbed: W_UK")


def _new_tokens_formulas(q_pe, c_kv, k_pe, cos, sin, norm, before, positions):
    """MLA's new-token work by the formulas on the CPU: the rotated query, and a copy of the cache
    `before` with each token's entry (normalised latent, rotated rope key) written at `positions`."""
    key = apply_rotary(k_pe.unsqueeze(1), cos, sin, True).squeeze(1)
    cache = before.clone()
    LayerCache(cache, 1).write(positions, torch.cat((norm(c_kv), key), dim=-1))
    return apply_rotary(q_pe, cos, sin, True), cache


CHECKS = (check_gemv, check_moe_decode, check_quant_moe_decode, check_quant_gemv, check_quant_gemv_pairs,
          check_dequantize,
          check_quant_grouped_gemm, check_route, check_routed_gate_up, check_add_norm_logits, check_mha_decode,
          check_mla_decode, check_moe_glue, check_norm_rope, check_mla_new_tokens)


def interpreted(*names: str) -> None:
    """Run the named checks on the CPU in Triton's interpreter (needs a recent Triton: the 3.6
    interpreter fails on loops bounded by kernel arguments), then compile every launch they made
    for sm_90 and sm_80 (hopper_compile.py), which the interpreter alone would not refuse."""
    with tempfile.TemporaryDirectory() as folder:
        launches = os.path.join(folder, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", KERNEL_LAUNCHES=launches)
        done = subprocess.run([sys.executable, __file__, *names], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert all(f"ok {name}" in done.stdout for name in names), done.stdout
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_compile.py")), launches], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr


def kernel_tests(*names: str):
    """The two tests of a kernel file: the named checks in Triton's interpreter (CPU-only hosts) and on
    CUDA in bf16 (skipped without CUDA)."""
    import pytest

    checks = [check for check in CHECKS if check.__name__ in names]

    @pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the compiled kernels are checked instead")
    def in_triton_interpreter():
        pytest.importorskip("triton")
        interpreted(*names)

    @pytest.mark.cuda
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("check", checks, ids=lambda c: c.__name__)
    def on_cuda(check):
        pytest.importorskip("triton")
        check("cuda", torch.bfloat16, 2e-2)

    return in_triton_interpreter, on_cuda


if __name__ == "__main__":
    if os.environ.get("KERNEL_LAUNCHES"):
        from hopper_compile import record

        record(os.environ["KERNEL_LAUNCHES"])
    for check in CHECKS:
        if check.__name__ in sys.argv[1:]:
            check("cpu", torch.float16, 2e-3)
            print("ok", check.__name__, flush=True)
