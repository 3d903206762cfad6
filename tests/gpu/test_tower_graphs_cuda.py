"""The vision tower's graphs on CUDA (skipped without it), bf16 tiny fixture: one graph per tile count
captured, and tiles replayed through them get the eager tower's features, also past the largest
count (in pieces), on the stream of the call."""
import pytest
import torch

from deepseek_vl2.engine.tower_graphs import TowerGraphs
from deepseek_vl2.modeling.vision import tower_features
from goldens import fixture_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@torch.inference_mode()
def test_tiles_through_the_graphs_get_the_eager_features():
    model = fixture_model("tiny_mha", torch.bfloat16).cuda()
    graphs = TowerGraphs(model, max_tiles=4)
    assert "captured 4 vision-tower graphs (1 to 4 tiles)" in graphs.capture_all(torch.cuda.Stream())
    assert sorted(graphs.graphs) == [1, 2, 3, 4]
    generator = torch.Generator().manual_seed(0)
    size = model.vision.patch_embed.img_size
    for count in (1, 3, 4, 9):
        tiles = torch.randn(count, 3, *size, generator=generator).clamp(-1, 1).cuda().bfloat16()
        expected = tower_features(model.vision, tiles)
        features = graphs(tiles)
        assert features.shape == expected.shape == (count, 729, model.vision.embed_dim)
        torch.testing.assert_close(features, expected, rtol=0.02, atol=0.02)
        assert expected.abs().max() > 0.5  # features worth comparing
    # the last, 9 tiles, ran as 4 + 4 + 1: their features are a tensor of their own, which a later call leaves alone
    graphs(torch.zeros(2, 3, *size, device="cuda", dtype=torch.bfloat16))
    torch.testing.assert_close(features, expected, rtol=0.02, atol=0.02)
