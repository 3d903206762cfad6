"""quantization/weight.py: QuantizedWeight storage, written slice by slice as a checkpoint arrives."""
import pytest
import torch

from deepseek_vl2.quantization import rtn
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.weight import QuantizedWeight


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_slices_written_one_at_a_time_equal_the_whole(scheme):
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 2 * 24, 96, generator=g)
    qw = QuantizedWeight(tuple(full.shape), QuantizationConfig(scheme, 32), torch.float32)
    for e in range(3):  # as the official checkpoint stores experts: gate rows, up rows, one expert at a time
        qw.write((e, slice(0, 24)), full[e, :24])
        qw.write((e, slice(24, 48)), full[e, 24:])
    q, scale, zero = rtn.quantize(full, qw.bits, qw.group, torch.float32)
    assert torch.equal(qw.qweight, q) and torch.equal(qw.scale, scale)
    assert (qw.zero is None) == (zero is None) and (zero is None or torch.equal(qw.zero, zero))
    assert torch.equal(qw.dequantize(), rtn.dequantize(q, scale, zero, torch.float32))
    stored = qw.qweight.numel() * qw.qweight.element_size()
    assert stored == full.numel() // (1 if scheme == "int8" else 2)


def test_storage_dtypes_and_shapes():
    qw = QuantizedWeight((6, 256), QuantizationConfig("int4"), torch.bfloat16)
    assert (qw.qweight.dtype, tuple(qw.qweight.shape)) == (torch.uint8, (6, 128))
    assert tuple(qw.scale.shape) == tuple(qw.zero.shape) == (6, 2) and qw.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in qw.parameters())
    with pytest.raises(ValueError, match="written by rows"):
        qw.write((slice(None), slice(0, 8)), torch.zeros(6, 8))
