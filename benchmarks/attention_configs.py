"""Time one-token MHA decode attention at tiny's shapes (10 heads x 128, a 2304-key bucket, the
cache strided as the static cache holds it) inside a CUDA graph (kernel_timing.py): PyTorch SDPA
with the additive mask against decode_attention.mha_decode over tile configurations.

    python benchmarks/attention_configs.py
"""
import itertools

import torch
import torch.nn.functional as F

from deepseek_vl2.kernels import decode_attention as td
from kernel_timing import copies_for, graph_us


def main():
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
