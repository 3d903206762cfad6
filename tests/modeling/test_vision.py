"""The vision tower run in pieces (what the continuous engine interleaves with decode steps) gives
the features of the tower run whole, to the bit."""
import pytest
import torch

from deepseek_vl2.modeling.vision import TowerPieces, build_vision_tower, tower_features
from deepseek_vl2.modeling.vl_config import VisionEncoderConfig
from deepseek_vl2.weights.random_init import init_random_weights


@pytest.mark.parametrize("blocks", [1, 2, 3])
@torch.no_grad()
def test_tower_pieces_give_the_whole_tower_s_features(blocks):
    config = VisionEncoderConfig(image_size=56, patch_size=14, width=32, layers=5, heads=4, mlp_ratio=2)
    tower = init_random_weights(build_vision_tower(config), std=0.2, seed=0).eval()
    tiles = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    whole = tower_features(tower, tiles)
    pieces = TowerPieces(tower, tiles)
    results = []
    while pieces.features is None:
        left = pieces.blocks_left
        results.append(pieces.advance(blocks))
        assert pieces.blocks_left == max(left - blocks, 0)
    assert len(results) == -(-5 // blocks) and all(r is None for r in results[:-1])
    assert whole.shape == (3, 16, 32) and torch.equal(results[-1], whole)
    assert pieces.advance(blocks) is results[-1]  # done: the same features again, nothing run
