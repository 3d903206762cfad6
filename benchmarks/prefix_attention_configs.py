"""Time a prompt chunk's attention over its cache row inside a CUDA graph (kernel_timing.py), as the
continuous engine's decode step runs it: SDPA with the chunk's additive mask (the path before the
prefix kernel) against prefix_attention over tile configurations, at tiny's shapes (10 heads x 128)
and at small's MLA shapes (16 heads, latents expanded through kv_b_proj: keys 128 + a shared rope
key of 64, values 128). The chunk is 256 tokens at positions 1024-1279 of a 2304-key bucket.

    python benchmarks/prefix_attention_configs.py
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import dispatch, prefix_attention, reference  # noqa: E402
from deepseek_vl2.modeling.attention import chunk_attention_inputs  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402

S, START, KV_LEN, CAPACITY = 256, 1024, 2304, 4096
CONFIGS = list(itertools.product((16, 32, 64), (32, 64, 128), (4, 8)))  # block_m, block_n, num_warps


def bf16(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def sweep(launch, n: int, what: str) -> None:
    """Time `launch(i, block_m, block_n, num_warps)` for each of CONFIGS."""
    for bm, bn, warps in CONFIGS:
        try:
            us = graph_us(lambda i: lambda: launch(i, bm, bn, warps), n)
        except Exception as error:  # a tile that does not fit (shared memory): skip it
            print(f"  prefix block_m {bm:3d} block_n {bn:3d} warps {warps}: failed ({type(error).__name__})")
            continue
        print(f"  prefix block_m {bm:3d} block_n {bn:3d} warps {warps}: {us:.1f} us{what}")


def main():
    torch.manual_seed(0)
    positions = torch.arange(START, START + S, device="cuda")
    mask = chunk_attention_inputs(positions, KV_LEN, torch.bfloat16).mask
    with torch.inference_mode():
        H, D = 10, 128
        n = copies_for(2 * H * KV_LEN * D * 2)
        caches = [bf16(1, 2, H, CAPACITY, D)[:, :, :, :KV_LEN] for _ in range(n)]
        q = bf16(1, H, S, D)
        sdpa = graph_us(lambda i: lambda: dispatch.mha_attention(q, caches[i], mask), n)
        print(f"tiny MHA: SDPA with the mask {sdpa:.1f} us per layer")
        qs, kvs = q[0].transpose(0, 1), [c[0].transpose(1, 2) for c in caches]
        sweep(lambda i, bm, bn, warps: prefix_attention.prefix_attention(
            qs, kvs[i][0], kvs[i][1], positions, D**-0.5, block_m=bm, block_n=bn, num_warps=warps), n, "")

        H, nope, rope, v_dim, rank = 16, 128, 64, 128, 512
        n = copies_for(KV_LEN * H * (nope + v_dim) * 2)
        latents = [bf16(1, CAPACITY, rank + rope)[:, :KV_LEN] for _ in range(n)]
        kv_b = bf16(H * (nope + v_dim), rank) * 0.05
        q_nope, q_pe = bf16(1, H, S, nope), bf16(1, H, S, rope)
        expanded = graph_us(lambda i: lambda: reference.mla_expanded(q_nope, q_pe, latents[i], mask, kv_b, 0.1), n)
        print(f"small MLA: expanded + SDPA with the mask {expanded:.1f} us per layer")
        expand = graph_us(lambda i: lambda: reference.expand_latents(latents[i], kv_b, H, nope), n)
        print(f"  of which the expansion (kv_b_proj) {expand:.1f} us")
        parts = [reference.expand_latents(latent, kv_b, H, nope) for latent in latents]
        qn, qp = q_nope[0].transpose(0, 1), q_pe[0].transpose(0, 1)
        sweep(lambda i, bm, bn, warps: prefix_attention.prefix_attention(
            qn, parts[i][0][0], parts[i][1][0], positions, 0.1, qp, latents[i][0, :, rank:], block_m=bm,
            block_n=bn, num_warps=warps), n, " (+ the expansion)")


if __name__ == "__main__":
    main()
