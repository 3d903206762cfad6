"""Host (CPU) microseconds per eager call of the Triton kernels used outside CUDA graphs (prefill):
through the plain Python launcher, the bare Triton launch, the torch custom op (what compiled
regions call), and the PyTorch formula replaced. Tiny inputs, so the GPU is never the limit.

    python benchmarks/host_overhead.py
"""
import time

import torch

from deepseek_vl2.kernels import custom_ops, moe_glue, norm_rope as tnr
from deepseek_vl2.modeling.rms_norm import RMSNorm


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main():
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    gate_up = torch.randn(4, 2816, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(2048).cuda().to(torch.bfloat16)
    with torch.no_grad():
        print(f"rms_norm launcher           {host_us(lambda: tnr.rms_norm(x, w, 1e-6)):.1f} us")
        launch = lambda: tnr._rms_norm_kernel[(4,)](x, w, out, 2048, 2048, 2048, 1e-6, BLOCK=2048, PDL=False, num_warps=4)  # noqa: E731,E501
        print(f"rms_norm bare Triton launch {host_us(launch):.1f} us")
        formula = lambda: norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)  # noqa: E731
        print(f"rms_norm PyTorch formula    {host_us(formula):.1f} us")
        print(f"silu_mul launcher           {host_us(lambda: moe_glue.silu_mul(gate_up)):.1f} us")
        custom_ops.register_kernel_ops()
        print(f"silu_mul custom op          {host_us(lambda: torch.ops.deepseek_vl2.silu_mul(gate_up)):.1f} us")
        print(f"one aten add                {host_us(lambda: x + x):.1f} us")


if __name__ == "__main__":
    main()
