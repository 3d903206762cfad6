"""dispatch.py on the CPU (and with grad mode on): every op takes the PyTorch reference path."""
import torch

from deepseek_vl2.kernels import dispatch, reference


def test_cpu_ops_are_the_reference_ops():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    assert torch.equal(dispatch.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    q, cos, sin = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    assert torch.equal(dispatch.rotary(q, cos, sin, True), reference.rotary(q, cos, sin, True))
    gate_up = torch.randn(4, 12, generator=g)
    assert torch.equal(dispatch.silu_mul(gate_up), reference.silu_mul(gate_up))
    head = torch.randn(10, 16, generator=g)
    assert torch.equal(dispatch.lm_head(x[:1], head), torch.nn.functional.linear(x[:1], head))
    kv = torch.randn(1, 2, 2, 3, 8, generator=g)
    assert torch.equal(dispatch.mha_attention(q.expand(1, 2, 3, 8), kv, None), reference.mha_attention(q, kv, None))


def test_rotary_formula_rotates_interleaved_pairs():
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    assert reference.deinterleave(x).tolist() == [[[[1.0, 3.0, 2.0, 4.0]]]]
    cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)  # a quarter turn: (a, b) -> (-b, a)
    assert reference.rotary(x, cos, sin).tolist() == [[[[-3.0, -4.0, 1.0, 2.0]]]]
