"""kernels/moe_glue.py (silu_mul, combine_sorted) against reference.silu_mul / reference.combine."""
from kernel_checks import kernel_tests

test_moe_glue_in_triton_interpreter, test_moe_glue_on_cuda = kernel_tests('check_moe_glue')
