"""The RoPE tables (plain, linear, dynamic-NTK, YaRN) and the de-interleaving of MLA rope dims."""
import math

import torch

from deepseek_vl2.kernels.reference import deinterleave, rotary as apply_rotary
from deepseek_vl2.modeling.rope import RotaryEmbedding


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
