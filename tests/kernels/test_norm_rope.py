"""kernels/norm_rope.py (rms_norm, rotary, mla_new_tokens, mla_new_tokens_absorbed) against the
PyTorch formulas (bit for bit on CUDA)."""
from kernel_checks import kernel_tests

test_norm_rope_in_triton_interpreter, test_norm_rope_on_cuda = kernel_tests('check_norm_rope', 'check_mla_new_tokens')
