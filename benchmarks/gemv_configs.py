"""Time the decode expert gemv (one token: 6 routed + 2 shared experts) at the real expert shapes
over tile configurations, gate/up and down separately, to set kernels/gemv.py's heuristics; then the
plain one-token projections (attention, LM heads, and the MoE routers' float32 logits) through
cuBLAS (F.linear) against the gemv kernel, at gemv.py's own tiles and the best swept.
Timings are per call inside a CUDA graph, with weights from HBM (kernel_timing.py).

    python benchmarks/gemv_configs.py [--only experts|projections] [--projections "small router" ...]
"""
import argparse
import itertools

import torch

from deepseek_vl2.kernels import gemv as td
from kernel_timing import copies_for, graph_us

EXPERTS = {"tiny": (64, 896, 1280), "small": (64, 1408, 2048), "base": (72, 1536, 2560)}
PROJECTIONS = {"tiny qkv": (3840, 1280), "tiny o": (1280, 1280), "tiny lm_head": (129280, 1280),
               "small q_kv_a": (3648, 2048), "small o": (2048, 2048),
               "small lm_head": (129280, 2048), "base lm_head": (129280, 2560),
               "tiny router": (64, 1280), "small router": (64, 2048), "base router": (72, 2560)}


def projection_configs(N):
    """(rows per program, K block, warps) swept for an [N, K] weight: few output rows (the routers)
    get whole-row K blocks, the LM heads larger row blocks."""
    if N < 256:
        return list(itertools.product((1, 2, 4), (256, 512, 1024, 2048), (1, 2, 4)))
    if N >= 32768:
        return list(itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8)))
    return list(itertools.product((4, 8, 16), (64, 128, 256, 512), (2, 4, 8)))


def gbps(nbytes, us):
    return nbytes / us / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["experts", "projections"])
    parser.add_argument("--projections", nargs="+", choices=list(PROJECTIONS), default=list(PROJECTIONS),
                        help="the projection shapes to time (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = list(itertools.product((4, 8, 16), (64, 128, 256, 512), (2, 4, 8)))
    for variant, (E, I, h) in EXPERTS.items() if args.only != "projections" else ():
        w13 = torch.randn(E + 2, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E + 2, h, I, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
        n = 8  # 8 calls x 8 experts: each expert about once per cycle
        ids = [torch.randperm(E + 2, device="cuda")[:8] for _ in range(n)]
        act = td._gemv_launch(x, w13, ids[0], 8, True)
        for stage, run, nbytes in (
                ("gate_up", lambda i, c: lambda: td._gemv_launch(x, w13, ids[i], 8, True, *c), 8 * 2 * I * h * 2),
                ("down", lambda i, c: lambda: td._gemv_launch(act, w2, ids[i], 1, False, *c), 8 * I * h * 2)):
            current = graph_us(lambda i: run(i, (None, None, None)), n)  # gemv.py's choice
            timings = sorted((graph_us(lambda i: run(i, c), n), c) for c in configs)
            best = timings[0]
            print(f"{variant} {stage}: current {current:.1f} us ({gbps(nbytes, current):.0f} GB/s) | best "
                  f"{best[0]:.1f} us ({gbps(nbytes, best[0]):.0f} GB/s) at {best[1]} | next "
                  + ", ".join(f"{t:.1f}@{c}" for t, c in timings[1:4]), flush=True)
    for name in args.projections if args.only != "experts" else ():
        N, K = PROJECTIONS[name]
        n = copies_for(N * K * 2)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        out_dtype = torch.float32 if name.endswith("router") else None  # as dispatch takes the router's logits
        cublas = graph_us(lambda i: lambda: torch.nn.functional.linear(x, ws[i]), n)
        current = graph_us(lambda i: lambda: td._gemv_launch(x, ws[i], None, 1, False, out_dtype=out_dtype), n)
        timings = sorted((graph_us(lambda i: lambda: td._gemv_launch(x, ws[i], None, 1, False, *c,
                                                                     out_dtype=out_dtype), n), c)
                         for c in projection_configs(N))
        best = timings[0]
        print(f"{name}: cuBLAS {cublas:.1f} us ({gbps(N * K * 2, cublas):.0f} GB/s) | gemv current "
              f"{current:.1f} us at {td._gemv_tiles(ws[0], None, False)} | best {best[0]:.1f} us "
              f"({gbps(N * K * 2, best[0]):.0f} GB/s) at {best[1]} | next "
              + ", ".join(f"{t:.1f}@{c}" for t, c in timings[1:4]), flush=True)

if __name__ == "__main__":
    main()
