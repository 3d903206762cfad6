"""kernels/moe_decode.py (each expert finds its pairs among the ids, no sorting; bf16 and int8 / int4
stacks) against einsum products."""
from kernel_checks import kernel_tests

test_moe_decode_in_triton_interpreter, test_moe_decode_on_cuda = kernel_tests("check_moe_decode")
test_quant_moe_decode_in_triton_interpreter, test_quant_moe_decode_on_cuda = kernel_tests("check_quant_moe_decode")
