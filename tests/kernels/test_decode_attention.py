"""kernels/decode_attention.py (MHA and MLA decode) against SDPA / the latent softmax."""
from kernel_checks import kernel_tests

test_decode_attention_in_triton_interpreter, test_decode_attention_on_cuda = kernel_tests('check_mha_decode', 'check_mla_decode')
