"""kernels/quant_gemv.py (int8/int4 expert and plain gemv, with and without silu_mul; the int4 gate/up
writing the down's x pairs; dequantization) against einsum products with the PyTorch-dequantized
weights."""
from kernel_checks import kernel_tests

test_quant_gemv_in_triton_interpreter, test_quant_gemv_on_cuda = kernel_tests("check_quant_gemv", "check_dequantize")
test_x_pairs_in_triton_interpreter, test_x_pairs_on_cuda = kernel_tests("check_quant_gemv_pairs")


def test_gemv_refuses_x_pairs_it_cannot_read_or_write():
    """x pairs without the activations' dtype, pairs scaled for another chain than the tile's, and pairs
    asked of a tile that is not whole words of output: each a ValueError before any launch."""
    import pytest
    import torch

    pytest.importorskip("triton")
    from deepseek_vl2.kernels import quant_gemv
    from deepseek_vl2.quantization import rtn

    q, s, z = rtn.quantize(torch.randn(3, 64, 128), 4, 32, torch.float16)  # 3 experts, 64 outputs, 128 columns
    ids = torch.tensor([0, 2])
    pairs = torch.zeros(2, 5, 128 // 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs out_dtype"):
        quant_gemv.gemv_launch(pairs, q, s, z, ids, 1, False, x_chain=4)
    with pytest.raises(ValueError, match="scaled for chains of 1 words"):
        quant_gemv.gemv_launch(pairs, q, s, z, ids, 1, False, x_chain=1, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="tiles of whole words"):
        quant_gemv.gemv_launch(torch.randn(1, 128, dtype=torch.float16), q, s, z, ids, 2, True, 4, 128, 1, 1,
                               pairs_chain=4)
