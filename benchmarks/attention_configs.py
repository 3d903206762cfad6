"""Time one-token MHA decode attention at tiny's shapes (10 heads x 128, a 2304-key bucket, the
cache strided as the static cache holds it): cuDNN/PyTorch SDPA with the additive mask against
triton_decode.mha_decode over tile configurations, to set its defaults.

    python benchmarks/attention_configs.py
"""
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from deepseek_vl2.models import triton_decode as td


def main():
    torch.manual_seed(0)
    H, D, kv_len, capacity = 10, 128, 2304, 4096
    for B in (1, 8):
        cache = torch.randn(B, 2, H, capacity, D, device="cuda", dtype=torch.bfloat16)
        keys_values = cache[:, :, :, :kv_len]
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(B, kv_len, device="cuda", dtype=torch.bfloat16)
        mask[:, 2100:] = torch.finfo(torch.bfloat16).min
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(
            q[:, :, None], keys_values[:, 0], keys_values[:, 1], attn_mask=mask[:, None, None]), warmup=5, rep=50)
        configs = itertools.product((16, 32, 64), (264, 528, 1056), (1, 2, 4), (2, 4, 8))
        timings = sorted((do_bench(lambda: td.mha_decode(q, keys_values, mask, D**-0.5, *c), warmup=5, rep=50), c)
                         for c in configs)
        nbytes = 2 * B * H * kv_len * D * 2
        print(f"batch {B}: SDPA {sdpa * 1e3:.1f} us ({nbytes / sdpa / 1e6:.0f} GB/s) | mha_decode best "
              + ", ".join(f"{t * 1e3:.1f} us @ (block_n, programs, min_blocks, warps)={c}" for t, c in timings[:4]),
              flush=True)


if __name__ == "__main__":
    main()
