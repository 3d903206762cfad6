"""kernels/gemv.py (expert and plain gemv, with and without silu_mul) against einsum products."""
from kernel_checks import kernel_tests

test_gemv_in_triton_interpreter, test_gemv_on_cuda = kernel_tests('check_gemv')
