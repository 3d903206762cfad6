"""kernels/prefix_attention.py (a prompt chunk over its cache row) against the masked softmax."""
import pytest
import torch
from kernel_checks import kernel_tests

from deepseek_vl2.kernels.prefix_attention import prefix_attention

test_prefix_attention_in_triton_interpreter, test_prefix_attention_on_cuda = kernel_tests('check_prefix_attention')


def test_prefix_attention_refuses_a_strided_head_dimension_by_name():
    q, kv = torch.randn(4, 2, 16), torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="last dimension of q contiguous"):
        prefix_attention(torch.randn(4, 2, 32)[..., ::2], kv, kv, torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="last dimension of v contiguous"):
        prefix_attention(q, kv, torch.randn(8, 2, 32)[..., ::2], torch.arange(4), 1.0)
