"""RMSNorm rounds as the reference does: normalise in float32, cast, then scale."""
import torch

from deepseek_vl2.modeling.rms_norm import RMSNorm


def test_rms_norm_rounds_before_the_weight():
    norm = RMSNorm(4).to(torch.bfloat16)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.bfloat16)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.25]], dtype=torch.bfloat16)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normed)
