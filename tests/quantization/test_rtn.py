"""quantization/rtn.py: round-to-nearest int8 / int4 and the packed layout."""
import torch

from deepseek_vl2.quantization import rtn


def test_int8_is_symmetric_per_row_within_half_a_step():
    w = torch.randn(2, 7, 300, generator=torch.Generator().manual_seed(0))
    q, scale, zero = rtn.quantize(w, 8, 300, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (2, 7, 1) and zero is None
    assert torch.allclose(scale, w.abs().amax(-1, keepdim=True) / 127)
    assert q.abs().max() == 127  # each row's largest weight at the end of the range
    err = (rtn.dequantize(q, scale, zero, torch.float32) - w).abs()
    assert (err <= scale / 2 + 1e-7).all() and err.max() > 0


def test_int4_groups_packing_and_error():
    w = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    w[1, :64] = 0.25  # a constant group comes back exactly
    q, scale, zero = rtn.quantize(w, 4, 64, torch.float32)
    assert q.dtype == torch.uint8 and q.shape == (5, 128) and scale.shape == zero.shape == (5, 4)
    values = rtn.unpack_int4(q)
    assert values.max() <= 15 and torch.equal(values[:, 0::2], q & 15) and torch.equal(values[:, 1::2], q >> 4)
    groups = w.view(5, 4, 64)
    low, high = groups.amin(-1), groups.amax(-1)
    assert torch.allclose(scale, (high - low) / 15) and torch.equal(zero, low)
    back = rtn.dequantize(q, scale, zero, torch.float32)
    err = (back - w).view(5, 4, 64).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    assert torch.equal(back[1, :64], w[1, :64])
    # the group's minimum and maximum are grid points
    assert torch.allclose(back.view(5, 4, 64).amin(-1), low, atol=1e-6)
    assert torch.allclose(back.view(5, 4, 64).amax(-1), high, atol=1e-6)


def test_zero_rows_and_bf16_scales():
    w = torch.zeros(3, 128)
    for bits, group in ((8, 128), (4, 32)):
        q, scale, zero = rtn.quantize(w, bits, group, torch.bfloat16)
        assert scale.dtype == torch.bfloat16 and torch.equal(rtn.dequantize(q, scale, zero, torch.float32), w)
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    q, scale, zero = rtn.quantize(w, 4, 128, torch.bfloat16)
    err = (rtn.dequantize(q, scale, zero, torch.float32) - w).abs()
    assert (err <= scale.float() / 2 * 1.02 + 1e-3).all()  # rounded with the stored bf16 scale and zero
