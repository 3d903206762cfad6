"""Time the decode expert gemv (one token: 6 routed + 2 shared experts) at the real expert shapes
over tile configurations, gate/up and down separately, to set triton_decode's heuristics; then the
plain one-token projections (attention, LM head) through cuBLAS (F.linear) against the gemv kernel.

    python benchmarks/gemv_configs.py [--only experts|projections]
"""
import argparse
import itertools

import torch
from triton.testing import do_bench

from deepseek_vl2.models import triton_decode as td

EXPERTS = {"tiny": (64, 896, 1280), "small": (64, 1408, 2048), "base": (72, 1536, 2560)}
PROJECTIONS = {"tiny qkv": (3840, 1280), "tiny o": (1280, 1280), "tiny lm_head": (129280, 1280),
               "small q": (3072, 2048), "small kv_a": (576, 2048), "small o": (2048, 2048)}


def gbps(nbytes, ms):
    return nbytes / ms / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["experts", "projections"])
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = list(itertools.product((4, 8, 16), (64, 128, 256, 512), (2, 4, 8)))
    for variant, (E, I, h) in EXPERTS.items() if args.only != "projections" else ():
        w13 = torch.randn(E + 2, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E + 2, h, I, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
        ids = torch.cat([torch.randperm(E, device="cuda")[:6], torch.tensor([E, E + 1], device="cuda")])
        act = td._gemv_launch(x, w13, ids, 8, True)
        for stage, run, nbytes in (
                ("gate_up", lambda bn, bk, nw: td._gemv_launch(x, w13, ids, 8, True, bn, bk, nw), 8 * 2 * I * h * 2),
                ("down", lambda bn, bk, nw: td._gemv_launch(act, w2, ids, 1, False, bn, bk, nw), 8 * I * h * 2)):
            current = do_bench(lambda: run(None, 128, 8), warmup=5, rep=40)
            timings = sorted((do_bench(lambda: run(bn, bk, nw), warmup=5, rep=40), bn, bk, nw)
                             for bn, bk, nw in configs)
            best = timings[0]
            print(f"{variant} {stage}: current {current * 1e3:.1f} us ({gbps(nbytes, current):.0f} GB/s) | best "
                  f"{best[0] * 1e3:.1f} us ({gbps(nbytes, best[0]):.0f} GB/s) at {best[1:]} | next "
                  + ", ".join(f"{t * 1e3:.1f}@{c}" for t, *c in timings[1:4]), flush=True)
    for name, (N, K) in PROJECTIONS.items() if args.only != "experts" else ():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        cublas = do_bench(lambda: torch.nn.functional.linear(x, w), warmup=5, rep=40)
        timings = sorted((do_bench(lambda: td._gemv_launch(x, w, None, 1, False, bn, bk, nw), warmup=5, rep=40),
                          bn, bk, nw) for bn, bk, nw in configs)
        best = timings[0]
        print(f"{name}: cuBLAS {cublas * 1e3:.1f} us ({gbps(N * K * 2, cublas):.0f} GB/s) | gemv best "
              f"{best[0] * 1e3:.1f} us ({gbps(N * K * 2, best[0]):.0f} GB/s) at {best[1:]}", flush=True)


if __name__ == "__main__":
    main()
