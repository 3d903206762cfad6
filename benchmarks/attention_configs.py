"""Time one-token decode attention inside a CUDA graph (kernel_timing.py).

    python benchmarks/attention_configs.py          MHA at tiny's shapes (10 heads x 128, a 2304-key
                                                    bucket, the cache strided as the static cache
                                                    holds it): PyTorch SDPA with the additive mask
                                                    against decode_attention.mha_decode's tiles
    python benchmarks/attention_configs.py --mla    MLA at small's and base's shapes (2054 cached
                                                    latents): kv_b_proj's halves as batched matmuls
                                                    around mla_decode against mla_decode_heads, by
                                                    batch rows (dispatch.MLA_HEADS_ROWS)
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from deepseek_vl2.kernels import decode_attention as td, reference
from kernel_timing import copies_for, graph_us


def mla_rows():
    """Per batch size, microseconds of the two MLA decode paths (the ones dispatch.mla_attention picks
    between), at small's (16 heads) and base's (32 heads) shapes."""
    torch.manual_seed(0)
    nope, rope, v, rank, kv_len, capacity = 128, 64, 128, 512, 2054, 4096
    for heads in (16, 32):
        kv_b = torch.randn(heads * (nope + v), rank, device="cuda", dtype=torch.bfloat16) * 0.05
        w_uk, w_uv = reference.kv_b_halves(kv_b, heads, nope)
        for B in (1, 2, 4, 8, 16, 32):
            n = copies_for(B * kv_len * (rank + rope) * 2)
            caches = [torch.randn(B, capacity, rank + rope, device="cuda", dtype=torch.bfloat16)[:, :kv_len]
                      for _ in range(n)]
            q = torch.randn(B, 1, heads, nope + rope, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            q_nope, q_pe = q.split((nope, rope), dim=-1)
            mask = torch.zeros(B, kv_len, device="cuda", dtype=torch.bfloat16)
            scale = (nope + rope) ** -0.5

            def matmuls(i):
                def run():
                    q_absorbed = reference.per_head_matmul(q_nope, w_uk)
                    out = td.mla_decode(q_absorbed[:, :, 0], q_pe[:, :, 0], caches[i], mask, scale)
                    return reference.per_head_matmul(out[:, :, None], w_uv.transpose(1, 2))
                return run

            def fused(i):
                return lambda: td.mla_decode_heads(q_nope[:, :, 0], q_pe[:, :, 0], caches[i], mask, w_uk, w_uv,
                                                   scale)

            want = matmuls(0)()[:, :, 0].float()
            err = ((fused(0)().float() - want).abs().max() / want.abs().max()).item()
            print(f"{heads} heads, batch {B}: matmuls around mla_decode {graph_us(matmuls, n):.1f} us, "
                  f"mla_decode_heads {graph_us(fused, n):.1f} us (max error {err:.1e} of the largest)",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mla", action="store_true", help="MLA's two decode paths by batch rows")
    if parser.parse_args().mla:
        mla_rows()
        return
    torch.manual_seed(0)
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
        timings = sorted((graph_us(lambda i: lambda: td.mha_decode(q, caches[i], mask, D**-0.5, *c), n), c)
                         for c in configs)
        print(f"batch {B}: SDPA {base:.1f} us ({nbytes / base / 1e3:.0f} GB/s) | mha_decode (block_n, programs, "
              "min_blocks, warps): " + ", ".join(f"{t:.1f} us @ {c}" for t, c in timings[:4]), flush=True)


if __name__ == "__main__":
    main()
