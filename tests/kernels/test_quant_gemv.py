"""kernels/quant_gemv.py (int8/int4 expert and plain gemv, with and without silu_mul; the int4 gate/up
writing the down's x pairs; dequantization) against einsum products with the PyTorch-dequantized
weights."""
from kernel_checks import kernel_tests

test_quant_gemv_in_triton_interpreter, test_quant_gemv_on_cuda = kernel_tests(
    "check_quant_gemv", "check_quant_gemv_pairs", "check_dequantize")
