"""The LM head (129280 outputs) at 1 to 64 decode rows, in bf16 and quantized to int8 (one scale per
row, QuantizationConfig's lm_head), through each path dispatch.py can take, to set
dispatch.LM_HEAD_GEMV_ROWS and LM_HEAD_WEIGHT_FIRST_ROWS: the gemv (which reads the head once a row), cuBLAS (bf16) or the dense
tiles (int8, weight tile first in 16-row programs; also in 64-row programs, rows first), and what
dispatch.lm_head picks. Microseconds per call inside a CUDA graph, the head read from HBM
(kernel_timing.py); also the largest difference of dispatch's int8 logits from the dequantized head's.

    python benchmarks/lm_head_rows.py [--variants tiny small base] [--rows 1 2 4 8 16 32 64]
"""
import argparse

import torch
import torch.nn.functional as F

from deepseek_vl2.kernels import dispatch, gemv, quant_gemv, quant_grouped_gemm
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.weight import QuantizedWeight
from kernel_timing import graph_us

HIDDEN = {"tiny": 1280, "small": 2048, "base": 2560}
VOCAB = 129280


def paths(x, head, quantized):
    """Name -> thunk of every path for x's rows."""
    q = quantized
    return {
        "bf16 gemv": lambda: gemv.gemv(x, head, None, 1, False),
        "bf16 cuBLAS": lambda: F.linear(x, head),
        "bf16 dispatch": lambda: dispatch.lm_head(x, head),
        "int8 gemv": lambda: quant_gemv.gemv(x, q.qweight, q.scale, None, None, 1, False),
        "int8 tiles 16": lambda: quant_grouped_gemm.dense_gemm(x, q.qweight, q.scale, None),
        "int8 tiles 64": lambda: quant_grouped_gemm.dense_gemm(x, q.qweight, q.scale, None, 64),
        "int8 dispatch": lambda: dispatch.lm_head(x, q),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small", "base"], choices=list(HIDDEN))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (largest |int8 dispatch - "
          f"dequantized head| over the largest logit)")
    for variant in args.variants:
        K = HIDDEN[variant]
        head = (torch.randn(VOCAB, K, device="cuda") * 0.02).to(torch.bfloat16)
        quantized = QuantizedWeight((VOCAB, K), QuantizationConfig("int8"), torch.bfloat16, "cuda")
        quantized.write((), head)
        print(f"{variant} LM head {VOCAB} x {K}")
        with torch.inference_mode():
            for rows in args.rows:
                x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
                exact = x.float() @ quantized.dequantize(torch.float32).T
                err = (dispatch.lm_head(x, quantized).float() - exact).abs().max() / exact.abs().max()
                times = {name: graph_us(lambda i, thunk=thunk: thunk, 1, calls=16)
                         for name, thunk in paths(x, head, quantized).items()}
                print(f"  {rows:3d} rows: " + ", ".join(f"{name} {us:.1f}" for name, us in times.items())
                      + f" (err {err:.1e})", flush=True)
        del head, quantized
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
