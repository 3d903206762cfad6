"""dispatch.py on the CPU (and with grad mode on): every op takes the PyTorch reference path."""
import pytest
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


def test_sdpa_backends_leave_the_cpu_to_pytorch():
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with dispatch.sdpa_backends(torch.zeros(1)):
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sdpa_avoids_cudnn_and_matches_the_default_choice():
    """cuDNN's attention plans every new shape (tens of ms); the plan-free backends give the same
    attention within bf16 noise, with and without a mask."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    mask = torch.ones(77, 77, device="cuda", dtype=torch.bool).tril()
    for kw in (dict(is_causal=True), dict(attn_mask=mask), {}):
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        with dispatch.sdpa_backends(q):
            choice = torch._fused_sdp_choice(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False))
            got = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        assert choice != torch.nn.attention.SDPBackend.CUDNN_ATTENTION.value
        assert (got.float() - expected).abs().max().item() < 2e-2

