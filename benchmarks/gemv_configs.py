"""Time the decode gemv kernel against cuBLAS (F.linear / the grouped-GEMM MoE) on the real
projection shapes, over a few tile configurations, to set triton_decode's heuristics.

    python benchmarks/gemv_configs.py
"""
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from deepseek_vl2.models import triton_decode as td

SHAPES = {  # name: (N, K) of the weight; rows of x
    "tiny qkv": (3840, 1280), "tiny o": (1280, 1280), "tiny shared gate_up": (3584, 1280),
    "tiny shared down": (1280, 1792), "small q": (3072, 2048), "small kv_a": (576, 2048),
    "small o": (2048, 2048), "small shared gate_up": (5632, 2048), "small shared down": (2048, 2816),
    "base q": (6144, 2560), "base o": (2560, 4096),
}
EXPERTS = {"tiny": (64, 896, 1280), "small": (64, 1408, 2048), "base": (72, 1536, 2560)}


def gbps(nbytes, ms):
    return nbytes / ms / 1e6


def main():
    torch.manual_seed(0)
    configs = list(itertools.product((8, 16, 32), (128, 256, 512), (4, 8)))
    for rows in (1, 4, 8):
        for name, (N, K) in SHAPES.items():
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            nbytes = w.numel() * 2
            cublas = do_bench(lambda: F.linear(x, w), warmup=5, rep=30)
            best = min((do_bench(lambda: td._gemv_launch(x, w, None, 1, False, bn, bk, nw), warmup=5, rep=30), bn, bk, nw)
                       for bn, bk, nw in configs)
            default = do_bench(lambda: td._gemv_launch(x, w, None, 1, False), warmup=5, rep=30)
            print(f"rows {rows} {name:22s} cuBLAS {gbps(nbytes, cublas):6.0f} GB/s | gemv default "
                  f"{gbps(nbytes, default):6.0f} | best {gbps(nbytes, best[0]):6.0f} GB/s at {best[1:]}", flush=True)
    for variant, (E, I, h) in EXPERTS.items():
        w13 = torch.randn(E, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E, h, I, device="cuda", dtype=torch.bfloat16) * 0.02
        for tokens in (1, 8):
            x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, device="cuda")[:6] for _ in range(tokens)])
            flat = ids.flatten()
            used = flat.unique().numel()
            nbytes = used * 3 * I * h * 2

            def fused(bn=None, bk=None, nw=4):
                act = td._gemv_launch(x, w13, flat, 6, True, bn, bk, nw)
                return td._gemv_launch(act, w2, flat, 1, False, bn, bk, nw)

            def grouped():
                order = flat.argsort(stable=True)
                counts = torch.zeros(E, dtype=torch.int32, device="cuda").scatter_add_(
                    0, flat, torch.ones_like(flat, dtype=torch.int32))
                ends = counts.cumsum(0, dtype=torch.int32)
                hidden = torch._grouped_mm(x[order // 6], w13.transpose(1, 2), offs=ends)
                g, u = hidden.chunk(2, -1)
                return torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=ends)

            t_grouped = do_bench(grouped, warmup=5, rep=30)
            best = min((do_bench(lambda: fused(bn, bk, nw), warmup=5, rep=30), bn, bk, nw) for bn, bk, nw in configs)
            t_default = do_bench(fused, warmup=5, rep=30)
            print(f"experts {variant} tokens {tokens}: grouped {gbps(nbytes, t_grouped):6.0f} GB/s | gemv default "
                  f"{gbps(nbytes, t_default):6.0f} | best {gbps(nbytes, best[0]):6.0f} GB/s at {best[1:]}", flush=True)


if __name__ == "__main__":
    main()
