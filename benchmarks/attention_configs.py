"""Time one-token decode attention inside CUDA graphs (kernel_timing.py) over tile configurations.

    python benchmarks/attention_configs.py [--mla]

Default: MHA at tiny's shapes (10 heads x 128, a 2304-key bucket, the cache strided as the static
cache holds it), PyTorch SDPA with the additive mask against decode_attention.mha_decode.
--mla: MLA over the latent cache at small's and base's heads (16, 32; rank 512, RoPE 64), 1 to 32
rows and 1100 to 4200 cached latents, decode_attention.mla_decode (the slices' kernel and their
combine) with its own tiles (`mla_tiles`) against the fastest of a sweep (32 heads also in
programs of 16).
--mla-values: MLA decode through W_UV at small's and base's heads, 1 to 64 rows, 2054 latents: the
slices' combine, then W_UV as a batched product (cuBLAS), against W_UV applied in the combine
(`mla_decode(..., w_uv=...)`) at several (value columns, warps) a program.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import decode_attention as td  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402


def mha():
    H, D, kv_len, capacity = 10, 128, 2304, 4096
    for B in (1, 8):
        nbytes = 2 * B * H * kv_len * D * 2
        n = copies_for(nbytes)
        caches = [torch.randn(B, 2, H, capacity, D, device="cuda", dtype=torch.bfloat16)[:, :, :, :kv_len]
                  for _ in range(n)]
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(B, kv_len, device="cuda", dtype=torch.bfloat16)
        mask[:, 2100:] = torch.finfo(torch.bfloat16).min

        def sdpa(i):
            return lambda: F.scaled_dot_product_attention(q[:, :, None], caches[i][:, 0], caches[i][:, 1],
                                                          attn_mask=mask[:, None, None])

        base = graph_us(sdpa, n)
        configs = itertools.product((16, 32, 64), (264, 528, 1056), (1, 2, 4), (2, 4, 8))
        timings = sorted((graph_us(lambda i: lambda: td.mha_decode(q, caches[i], mask, D**-0.5, c), n), c)
                         for c in configs)
        print(f"batch {B}: SDPA {base:.1f} us ({nbytes / base / 1e3:.0f} GB/s) | mha_decode (block_n, programs, "
              "min_blocks, warps): " + ", ".join(f"{t:.1f} us @ {c}" for t, c in timings[:4]), flush=True)


def mla():
    R, P = 512, 64
    for H, B, kv_len in itertools.product((16, 32), (1, 4, 16, 32), (1100, 2054, 4200)):
        head_groups = (None, 16) if H > 16 else (None,)  # all heads a program, or 16 (mla_tiles' fifth entry)
        configs = list(itertools.product((32, 64), (132, 264, 528, 1056), (1, 2, 4), (4, 8), head_groups))
        nbytes = B * kv_len * (R + P) * 2
        n = copies_for(nbytes)
        caches = [torch.randn(B, kv_len + 256, R + P, device="cuda", dtype=torch.bfloat16)[:, :kv_len]
                  for _ in range(n)]
        q_latent = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
        q_pe = torch.randn(B, H, P, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(1, kv_len, device="cuda", dtype=torch.bfloat16)

        def timed(tiles):
            return graph_us(lambda i: lambda: td.mla_decode(q_latent, q_pe, caches[i], mask, 192**-0.5, tiles), n)

        own = timed(None)
        best, tiles = min(((timed(c), c) for c in configs), key=lambda timed_tiles: timed_tiles[0])
        print(f"{H} heads, {B} rows, {kv_len} latents: mla_tiles {td.mla_tiles(B)} {own:.2f} us | best of the sweep "
              f"{best:.2f} us at {tiles} (block_n, programs, min_blocks, warps, heads): x{own / best:.2f}", flush=True)


def mla_values():
    R, P, nope, V, kv_len = 512, 64, 128, 128, 2054
    for H, B in itertools.product((16, 32), (1, 2, 4, 8, 16, 32, 64)):
        nbytes = B * kv_len * (R + P) * 2 + H * (nope + V) * R * 2
        n = copies_for(nbytes)
        caches = [torch.randn(B, kv_len + 256, R + P, device="cuda", dtype=torch.bfloat16)[:, :kv_len]
                  for _ in range(n)]
        w_uvs = [(torch.randn(H, nope + V, R, device="cuda", dtype=torch.bfloat16) * 0.05)[:, nope:] for _ in range(n)]
        q_latent = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
        q_pe = torch.randn(B, H, P, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(1, kv_len, device="cuda", dtype=torch.bfloat16)

        def separate(i):
            def call():
                out = td.mla_decode(q_latent, q_pe, caches[i], mask, 192**-0.5)
                return torch.bmm(out.transpose(0, 1), w_uvs[i].transpose(1, 2))
            return call

        def fused(i):
            return lambda: td.mla_decode(q_latent, q_pe, caches[i], mask, 192**-0.5, w_uv=w_uvs[i])

        before = graph_us(separate, n)
        timings = []
        for tiles in itertools.product((16, 32, 64), (4, 8)):
            td.combine_values_tiles = lambda rows, heads, tiles=tiles: tiles
            timings.append((graph_us(fused, n), tiles))
        print(f"{H} heads, {B} rows: combine + bmm {before:.2f} us | in the combine (value columns, warps): "
              + ", ".join(f"{t:.2f} @ {c}" for t, c in sorted(timings)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mla", action="store_true", help="MLA decode at small's and base's heads instead of MHA")
    parser.add_argument("--mla-values", action="store_true", help="MLA decode through W_UV: combine, then product, "
                        "against the product in the combine")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.mla_values:
        mla_values()
    elif args.mla:
        mla()
    else:
        mha()


if __name__ == "__main__":
    main()
