"""kernels/quant_grouped_gemm.py (int8/int4 expert stacks, rows sorted by expert, tiles dequantized in
registers) against per-expert products with the PyTorch-dequantized weights."""
from kernel_checks import kernel_tests

test_quant_grouped_gemm_in_triton_interpreter, test_quant_grouped_gemm_on_cuda = kernel_tests("check_quant_grouped_gemm")
