"""kernels/prefix_attention.py (a prompt chunk over its cache row) against the masked softmax."""
from kernel_checks import kernel_tests

test_prefix_attention_in_triton_interpreter, test_prefix_attention_on_cuda = kernel_tests('check_prefix_attention')
