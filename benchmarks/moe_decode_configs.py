"""Time one MoE layer's experts for a batch of decode rows, the three ways dispatch.experts can run
them, at the real expert shapes; then moe_decode's expert GEMM over tile configurations. Sets
dispatch.py's row limits and moe_decode.gemm_tiles (bf16) / quant_tiles (int8, int4). Timings are
per call inside a CUDA graph, with the weights from HBM (kernel_timing.py).

    python benchmarks/moe_decode_configs.py [--variants tiny small base] [--rows 1 2 4 8 16 32 64]
        [--quantization none int8 int4] [--sweep-rows 8 32]

Each row picks 6 distinct routed experts at random (as served tokens spread over them) and the 2
shared ones. The three ways:
  gemv      the expert gemv pair (each pair reads its expert; quant_gemv's for int8 / int4)
  sorted    sort by expert, grouped GEMMs (torch._grouped_mm; int8 / int4: quant_grouped_gemm,
            dequantizing tile by tile), combine_sorted
  moe       moe_decode.expert_gemm pair (each expert finds its pairs; quant_expert_gemm for int8 /
            int4), combine_pairs
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import dispatch, moe_decode  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402
from quant_gemv_configs import quantized_weight  # noqa: E402

EXPERTS = {"tiny": (64, 896, 1280), "small": (64, 1408, 2048), "base": (72, 1536, 2560)}
TOP_K, SHARED = 6, 2


def routing(rows: int, routed: int, copies: int):
    """Per copy: expert ids [rows, 8] (6 distinct routed, then the shared ones) and weights."""
    out = []
    for _ in range(copies):
        picks = torch.stack([torch.randperm(routed, device="cuda")[:TOP_K] for _ in range(rows)])
        shared = torch.arange(routed, routed + SHARED, device="cuda").expand(rows, SHARED)
        out.append((torch.cat((picks, shared), dim=1), torch.rand(rows, TOP_K + SHARED, device="cuda")))
    return out


def way(gemv_rows: int, moe_rows: int):
    """A thunk maker running dispatch.experts with the given row limits for the two decode paths (of
    bf16 stacks, and of quantized ones)."""
    def run(x, w13, w2, ids, weights):
        saved = dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS
        dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS = gemv_rows, moe_rows
        try:
            with dispatch.quant_expert_rows(gemv_rows, moe_rows):
                return dispatch.experts(x, w13, w2, ids, weights)
        finally:
            dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS = saved
    return run


WAYS = {"gemv": way(10**6, 0), "sorted": way(0, 0), "moe": way(0, 10**6)}


def fits(time_it) -> float:
    """time_it(), or infinity for a tile configuration that needs more shared memory than the GPU has."""
    try:
        return time_it()
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def stacks(variant: str, scheme: str, copies: int):
    """The variant's gate/up and down stacks (routed and shared experts), `copies` of each: bf16, or
    quantized from bf16 random weights."""
    E, I, h = EXPERTS[variant]
    w13, w2 = [], []
    for _ in range(copies):
        full13 = torch.randn(E + SHARED, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02
        full2 = torch.randn(E + SHARED, h, I, device="cuda", dtype=torch.bfloat16) * 0.02
        w13.append(full13 if scheme == "none" else quantized_weight(full13, scheme))
        w2.append(full2 if scheme == "none" else quantized_weight(full2, scheme))
        del full13, full2
    return w13, w2


def tile_configs(scheme: str):
    """(BLOCK_N, BLOCK_K, warps, stages) swept: bf16's expert_gemm, or quant_expert_gemm (int4 tiles
    are one group wide whatever BLOCK_K says)."""
    if scheme == "none":
        configs = [(n, k, 4, 3) for n, k in itertools.product((32, 64, 128), (64, 128, 256))]
        return configs + [(64, 128, 8, 3), (128, 128, 8, 3), (64, 128, 4, 4), (64, 256, 4, 4), (128, 256, 8, 4)]
    configs = [(n, 128, w, st) for n, w, st in itertools.product((32, 64, 128), (2, 4), (2, 4))] + [(64, 128, 4, 3)]
    return configs + ([] if scheme == "int4" else [(64, 256, 4, 3), (128, 256, 4, 3)])


def measure(variant: str, scheme: str, rows_list, sweep_rows):
    """The three ways at each of `rows_list`, then the moe way's tiles swept at each of `sweep_rows`."""
    E, I, h = EXPERTS[variant]
    bytes_per_weight = {"none": 2, "int8": 1, "int4": 0.5}[scheme]
    layer_bytes = int((E + SHARED) * 3 * I * h * bytes_per_weight)
    copies = copies_for(layer_bytes)
    w13, w2 = stacks(variant, scheme, copies)
    configs = tile_configs(scheme)
    launch = moe_decode.expert_gemm_launch if scheme == "none" else (
        lambda x, w, ids, per_id, silu, *tiles: moe_decode.quant_expert_gemm_launch(
            x, w.qweight, w.scale, w.zero, ids, per_id, silu, *tiles))
    print(f"{variant} {scheme}: {E}+{SHARED} experts of {I} x {h}, {copies} weight copies; us per MoE layer",
          flush=True)
    for rows in rows_list:
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        picks = routing(rows, E, copies)
        distinct = sum(len(ids.unique()) for ids, _ in picks) / copies
        times = {name: graph_us(lambda i, fn=fn: lambda: fn(x, w13[i], w2[i], *picks[i]), copies)
                 for name, fn in WAYS.items()}
        read = distinct * 3 * I * h * bytes_per_weight
        print(f"  {rows:3d} rows ({distinct:.1f} experts chosen): "
              + ", ".join(f"{name} {t:.1f}" for name, t in times.items())
              + f" | moe reads at {read / times['moe'] / 1e3:.0f} GB/s", flush=True)
    for rows in sweep_rows:
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        picks = routing(rows, E, copies)
        act = torch.randn(rows * (TOP_K + SHARED), I, device="cuda", dtype=torch.bfloat16)
        for stage, make in (
                ("gate_up", lambda c: lambda i: lambda: launch(x, w13[i], picks[i][0], TOP_K + SHARED, True, *c)),
                ("down", lambda c: lambda i: lambda: launch(act, w2[i], picks[i][0], 1, False, *c))):
            current = graph_us(make((None, None, None, None)), copies)
            timings = sorted((fits(lambda: graph_us(make(c), copies)), c) for c in configs)
            print(f"  {rows} rows {stage}: current {current:.1f} us | best {timings[0][0]:.1f} at {timings[0][1]}"
                  " | next " + ", ".join(f"{t:.1f}@{c}" for t, c in timings[1:5]), flush=True)


@torch.inference_mode()  # the kernels run in inference only (dispatch.py)
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=list(EXPERTS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 32, 64])
    parser.add_argument("--sweep-rows", nargs="*", type=int, default=[8, 32],
                        help="rows at which expert_gemm's tiles are swept")
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "int8", "int4"])
    args = parser.parse_args()
    torch.manual_seed(0)
    for variant, scheme in itertools.product(args.variants, args.quantization):
        measure(variant, scheme, args.rows, args.sweep_rows)


if __name__ == "__main__":
    main()
