"""Time one MoE layer's experts for a batch of decode rows, the three ways dispatch.experts can run
them, at the real expert shapes; then moe_decode's expert GEMM over tile configurations. Sets
dispatch.py's row limits and moe_decode.gemm_tiles. Timings are per call inside a CUDA graph, with
the weights from HBM (kernel_timing.py).

    python benchmarks/moe_decode_configs.py [--variants tiny small base] [--rows 1 2 4 8 16 32 64]

Each row picks 6 distinct routed experts at random (as served tokens spread over them) and the 2
shared ones. The three ways:
  gemv      the expert gemv pair (each pair reads its expert)
  sorted    sort by expert, grouped GEMMs (torch._grouped_mm), combine_sorted
  moe       moe_decode.expert_gemm pair (each expert finds its pairs), combine_pairs
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
    """A thunk maker running dispatch.experts with the given row limits for the two decode paths."""
    def run(x, w13, w2, ids, weights):
        saved = dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS
        dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS = gemv_rows, moe_rows
        try:
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


@torch.inference_mode()  # the kernels run in inference only (dispatch.py)
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=list(EXPERTS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 32, 64])
    parser.add_argument("--sweep-rows", nargs="*", type=int, default=[8, 32],
                        help="rows at which expert_gemm's tiles are swept")
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = [(n, k, 4, 3) for n, k in itertools.product((32, 64, 128), (64, 128, 256))]
    configs += [(64, 128, 8, 3), (128, 128, 8, 3), (64, 128, 4, 4), (64, 256, 4, 4), (128, 256, 8, 4)]
    for variant in args.variants:
        E, I, h = EXPERTS[variant]
        layer_bytes = (E + SHARED) * 3 * I * h * 2
        copies = copies_for(layer_bytes)
        w13 = [torch.randn(E + SHARED, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w2 = [torch.randn(E + SHARED, h, I, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        print(f"{variant}: {E}+{SHARED} experts of {I} x {h}, {copies} weight copies; us per MoE layer", flush=True)
        for rows in args.rows:
            x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
            picks = routing(rows, E, copies)
            distinct = sum(len(ids.unique()) for ids, _ in picks) / copies
            times = {name: graph_us(lambda i, fn=fn: lambda: fn(x, w13[i], w2[i], *picks[i]), copies)
                     for name, fn in WAYS.items()}
            read = distinct * 3 * I * h * 2
            print(f"  {rows:3d} rows ({distinct:.1f} experts chosen): "
                  + ", ".join(f"{name} {t:.1f}" for name, t in times.items())
                  + f" | moe reads at {read / times['moe'] / 1e3:.0f} GB/s", flush=True)
        for rows in args.sweep_rows:
            x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
            picks = routing(rows, E, copies)
            flat = [ids.flatten() for ids, _ in picks]
            act = torch.randn(rows * (TOP_K + SHARED), I, device="cuda", dtype=torch.bfloat16)
            for stage, make in (
                    ("gate_up", lambda c: lambda i: lambda: moe_decode.expert_gemm_launch(
                        x, w13[i], flat[i], TOP_K + SHARED, True, *c)),
                    ("down", lambda c: lambda i: lambda: moe_decode.expert_gemm_launch(act, w2[i], flat[i], 1, False,
                                                                                        *c))):
                current = graph_us(make((None, None, None, None)), copies)
                timings = sorted((fits(lambda: graph_us(make(c), copies)), c) for c in configs)
                print(f"  {rows} rows {stage}: current {current:.1f} us | best {timings[0][0]:.1f} at {timings[0][1]}"
                      " | next " + ", ".join(f"{t:.1f}@{c}" for t, c in timings[1:5]), flush=True)


if __name__ == "__main__":
    main()
