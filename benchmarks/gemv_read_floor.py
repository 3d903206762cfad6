"""How far the int4 gemv at one token is from the time it takes just to read its bytes, at the real shapes.

    python benchmarks/gemv_read_floor.py [--variants small base]

For each quantized weight of a decode step (one token's 8 experts' gate/up and down, the attention
projections), microseconds per call inside a CUDA graph with the weights from HBM
(kernel_timing.graph_us), for:

  gemv       quant_gemv.gemv_launch with its default tiles
  in L2      the same gemv on one copy of the inputs (the same experts) every call: its weights
             come from L2, so what is left is the gemv's own work and the latency of its loads
  same grid  a kernel with the gemv's grid and tiles that loads the same words, scales and zero
             points and only XORs them together: the reads as the gemv lays them out, no arithmetic
  stream     a kernel streaming each weight's bytes in contiguous chunks, the fastest of a few program
             counts and chunk sizes: what reading these bytes in one kernel takes at best
  empty      an empty kernel: the cost of one node of a graph

The gap between gemv and the two read-only kernels is the gemv's own work (unpacking, the products,
the dequantizing terms) that the loads do not hide; "in L2" says how much faster the gemv gets
with the reads made cheap (what pulling its weights into L2 ahead of time could give at most).
"""
import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import quant_gemv  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402
from quant_gemv_configs import EXPERTS, EXPERTS_PER_TOKEN, PROJECTIONS, nbytes, quantized  # noqa: E402

MAX_GROUPS = 64  # groups of 128 columns a row may have (the largest K here is base's 4096-column o)


@triton.jit
def _same_grid_kernel(q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, N, KW, G, stride_qe, stride_se, HAS_IDS: tl.constexpr,
                      BOTH_HALVES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      STAGES: tl.constexpr, MAX_G: tl.constexpr):
    """Program (n, a): rows [n * BLOCK_N, +BLOCK_N) of (expert ids[a]'s) words, BLOCK_W words a tile
    (and the same rows of the up half), then the rows' scales and zero points."""
    a = tl.program_id(1)
    q, s, z = q_ptr, s_ptr, z_ptr
    if HAS_IDS:
        expert = tl.load(ids_ptr + a).to(tl.int64)
        q, s, z = q_ptr + expert * stride_qe, s_ptr + expert * stride_se, z_ptr + expert * stride_se
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for w0 in tl.range(0, KW, BLOCK_W, num_stages=STAGES):
        cols = w0 + tl.arange(0, BLOCK_W)
        acc ^= tl.load(q + rows[:, None] * KW + cols[None, :])
        if BOTH_HALVES:
            acc ^= tl.load(q + (rows + N)[:, None] * KW + cols[None, :])
    groups = tl.arange(0, MAX_G)[None, :]
    offsets = rows[:, None] * G + groups
    terms = tl.load(s + offsets, mask=groups < G, other=0).to(tl.int16, bitcast=True)
    terms ^= tl.load(z + offsets, mask=groups < G, other=0).to(tl.int16, bitcast=True)
    tl.store(out_ptr + a * N + rows, tl.xor_sum(acc, axis=1) ^ tl.xor_sum(terms.to(tl.int32), axis=1))


@triton.jit
def _stream_kernel(q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, WORDS, TERMS, stride_qe, stride_se, HAS_IDS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Program (p, a): the p-th of P contiguous chunks of (expert ids[a]'s) words, scales and zero points."""
    p, P, a = tl.program_id(0), tl.num_programs(0), tl.program_id(1)
    q, s, z = q_ptr, s_ptr, z_ptr
    if HAS_IDS:
        expert = tl.load(ids_ptr + a).to(tl.int64)
        q, s, z = q_ptr + expert * stride_qe, s_ptr + expert * stride_se, z_ptr + expert * stride_se
    chunk = tl.cdiv(tl.cdiv(WORDS, P), BLOCK) * BLOCK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for w0 in tl.range(p * chunk, p * chunk + chunk, BLOCK, num_stages=3):
        offsets = w0 + tl.arange(0, BLOCK)
        acc ^= tl.load(q + offsets, mask=offsets < WORDS, other=0)
    chunk = tl.cdiv(tl.cdiv(TERMS, P), 256) * 256
    terms = tl.zeros((256,), dtype=tl.int16)
    for t0 in range(p * chunk, p * chunk + chunk, 256):
        offsets = t0 + tl.arange(0, 256)
        terms ^= tl.load(s + offsets, mask=offsets < TERMS, other=0).to(tl.int16, bitcast=True)
        terms ^= tl.load(z + offsets, mask=offsets < TERMS, other=0).to(tl.int16, bitcast=True)
    tl.store(out_ptr + a * P + p, tl.xor_sum(acc, axis=0) ^ tl.xor_sum(terms.to(tl.int32), axis=0))


@triton.jit
def _empty_kernel(out_ptr):
    pass


def floor_of(name, weights, x, ids, rows_per_id, silu_mul):
    """Print the four timings for one weight: `weights` copies of (q, scale, zero), [E, N', K/2] with
    `ids` (a list of id tensors, one per copy of the inputs) or [N', K/2] without."""
    q, s, z = weights[0]
    experts = ids is not None
    copies = len(ids) if experts else len(weights)
    pairs = ids[0].numel() if experts else 1
    moved = nbytes(q, s, z) // (q.shape[0] if experts else 1) * pairs
    N = q.shape[-2] // 2 if silu_mul else q.shape[-2]
    K, G = q.shape[-1] * 2, s.shape[-1]
    assert G <= MAX_GROUPS
    KW = K // 8
    out = torch.empty(pairs * 2 * N, dtype=torch.int32, device="cuda")

    def inputs(i):
        qq, ss, zz = weights[i % len(weights)]
        words = qq.view(torch.int32)
        return (words, ss, zz, ids[i] if experts else out, out, words.stride(0) if experts else 0,
                ss.stride(0) if experts else 0)

    gemv = graph_us(lambda i: (lambda: quant_gemv.gemv_launch(
        x, *weights[i % len(weights)], ids[i] if experts else None, rows_per_id, silu_mul)), copies)
    in_l2 = graph_us(lambda i: (lambda: quant_gemv.gemv_launch(
        x, *weights[0], ids[0] if experts else None, rows_per_id, silu_mul)), 1)
    block_n, block_k, warps, stages = quant_gemv.gemv_tiles(True, True, experts, silu_mul, N, K, pairs, K // G)
    block_w = max(block_k, K // G) // 8

    def same_grid(i):
        qq, ss, zz, idx, o, sqe, sse = inputs(i)
        return lambda: _same_grid_kernel[(triton.cdiv(N, block_n), pairs)](
            qq, ss, zz, idx, o, N, KW, G, sqe, sse, HAS_IDS=experts, BOTH_HALVES=silu_mul, BLOCK_N=block_n,
            BLOCK_W=block_w, STAGES=stages, MAX_G=MAX_GROUPS, num_warps=warps)

    def stream(programs, block, warps_s):
        P = max(1, programs // pairs)

        def call(i):
            qq, ss, zz, idx, o, sqe, sse = inputs(i)
            rows_all = 2 * N if silu_mul else N
            return lambda: _stream_kernel[(P, pairs)](qq, ss, zz, idx, o, rows_all * KW, rows_all * G, sqe, sse,
                                                      HAS_IDS=experts, BLOCK=block, num_warps=warps_s)
        return call

    same = graph_us(same_grid, copies)
    streams = sorted((graph_us(stream(*c), copies), c) for c in
                     [(p, b, w) for p in (132, 264, 528, 1056) for b in (1024, 2048) for w in (4, 8)])
    best, config = streams[0]
    print(f"{name}: {moved / 1e6:.1f} MB | gemv {gemv:.2f} us ({moved / gemv / 1e3:.0f} GB/s) | in L2 {in_l2:.2f} us "
          f"(gemv / in L2 {gemv / in_l2:.2f}) | same grid {same:.2f} us "
          f"| stream {best:.2f} us ({moved / best / 1e3:.0f} GB/s; {config[0]} programs, {config[1]}-word chunks, "
          f"{config[2]} warps) | gemv / stream {gemv / best:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "base"], choices=list(EXPERTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    empty = graph_us(lambda i: (lambda: _empty_kernel[(1,)](None)), 1, calls=64)
    print(f"empty kernel: {empty:.2f} us a graph node", flush=True)
    for variant in args.variants:
        E, I, h = EXPERTS[variant]
        ids = [torch.randperm(E + 2, device="cuda")[:EXPERTS_PER_TOKEN] for _ in range(8)]  # experts cycled over
        gate_up = quantized((E + 2, 2 * I, h), "int4")
        down = quantized((E + 2, h, I), "int4")
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
        act = quant_gemv.gemv_launch(x, *gate_up, ids[0], EXPERTS_PER_TOKEN, True)
        floor_of(f"{variant} experts gate/up", [gate_up], x, ids, EXPERTS_PER_TOKEN, True)
        floor_of(f"{variant} experts down", [down], act, ids, 1, False)
        del gate_up, down
        for name, (N, K) in PROJECTIONS.items():
            if name.split()[0] == variant and "dense" not in name:
                weight = quantized((N, K), "int4")
                copies = [weight] + [tuple(t.clone() for t in weight) for _ in range(copies_for(nbytes(*weight)) - 1)]
                floor_of(name, copies, torch.randn(1, K, device="cuda", dtype=torch.bfloat16), None, 1, False)


if __name__ == "__main__":
    main()
