"""Unit checks of pieces whose ordering or formulas parity depends on: the projector's 2x2 merge,
the RoPE variants, the de-interleaving of MLA rope dims, RMSNorm rounding."""
import math

import torch

from deepseek_vl2.models.projector import merge_windows
from deepseek_vl2.models.rms_norm import RMSNorm
from deepseek_vl2.models.rope import RotaryEmbedding, apply_rotary, deinterleave


def test_merge_windows_is_channel_major_with_bottom_right_zero_padding():
    side, C = 3, 2
    grid = torch.arange(side * side * C, dtype=torch.float32).view(1, side * side, C)
    merged = merge_windows(grid, 2)  # 3x3 -> padded 4x4 -> 2x2 windows of 4 cells x 2 channels
    assert merged.shape == (1, 4, 8)
    cell = lambda r, c, ch: grid[0, r * side + c, ch].item() if r < side and c < side else 0.0  # noqa: E731
    for R in range(2):
        for Cc in range(2):
            expected = [cell(2 * R + dr, 2 * Cc + dc, ch) for ch in range(C) for dr in range(2) for dc in range(2)]
            assert merged[0, R * 2 + Cc].tolist() == expected


def test_plain_rope_angles_and_interleaved_pairs():
    rope = RotaryEmbedding(8, 64, 10000.0)
    cos, sin = rope.lookup(torch.tensor([[5]]), torch.float32)
    inv = [1 / 10000 ** (2 * i / 8) for i in range(4)]
    assert torch.allclose(cos[0, 0], torch.tensor([math.cos(5 * f) for f in inv] * 2))
    x = torch.randn(1, 1, 1, 8)
    rotated = apply_rotary(deinterleave(x), cos, sin)[0, 0, 0]
    for i, f in enumerate(inv):  # pair (2i, 2i+1) rotated by 5 * inv_freq[i]
        a, b = x[0, 0, 0, 2 * i], x[0, 0, 0, 2 * i + 1]
        assert torch.isclose(rotated[i], a * math.cos(5 * f) - b * math.sin(5 * f), atol=1e-6)
        assert torch.isclose(rotated[4 + i], b * math.cos(5 * f) + a * math.sin(5 * f), atol=1e-6)


def test_scaled_rope_variants():
    positions = torch.tensor([[0, 7, 100]])
    plain = RotaryEmbedding(16, 128, 10000.0)
    linear = RotaryEmbedding(16, 128, 10000.0, {"type": "linear", "factor": 4.0})
    cos_linear, _ = linear.lookup(torch.tensor([[8]]), torch.float32)
    cos_plain, _ = plain.lookup(torch.tensor([[2]]), torch.float32)
    assert torch.allclose(cos_linear, cos_plain)  # position 8 / 4
    dynamic = RotaryEmbedding(16, 128, 10000.0, {"type": "dynamic", "factor": 2.0})
    assert torch.equal(dynamic.lookup(positions, torch.float32)[0], plain.lookup(positions, torch.float32)[0])
    longer = dynamic.lookup(positions, torch.float32, seq_len=300)[0]
    assert not torch.allclose(longer, plain.lookup(positions, torch.float32)[0])  # base grows past 128
    yarn = RotaryEmbedding(16, 128, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                              "mscale": 1.0, "mscale_all_dim": 1.0})
    freqs = yarn.inv_freq()
    base = plain.inv_freq()
    assert torch.isclose(freqs[0], base[0]) and torch.isclose(freqs[-1], base[-1] / 4)  # fast dims kept, slow scaled
    assert yarn.table_scale == 1.0 and math.isclose(yarn.attention_scale, (0.1 * math.log(4) + 1) ** 2)


def test_rms_norm_rounds_before_the_weight():
    norm = RMSNorm(4).to(torch.bfloat16)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.bfloat16)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.25]], dtype=torch.bfloat16)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normed)
