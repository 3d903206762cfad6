"""tower_graphs.py on the CPU: how many tiles one image is cut into at most, and the refusal of a tower
that is not on CUDA. The graphs themselves: tests/gpu/test_tower_graphs_cuda.py."""
import pytest

from deepseek_vl2.engine.tower_graphs import TowerGraphs, tiles_per_image
from deepseek_vl2.modeling.vl_config import DeepseekVLV2Config
from goldens import fixture_model


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla", "base_noaux"])
def test_an_image_gives_at_most_its_global_view_and_nine_local_tiles(checkpoint):
    # the largest candidate resolutions of every release: 1152 x 1152 (3 x 3) and 384 x 3456 (1 x 9)
    assert tiles_per_image(fixture_model(checkpoint).config) == 10


def test_the_largest_candidate_resolution_counts_not_the_last():
    config = DeepseekVLV2Config(candidate_resolutions=((768, 768), (384, 384)))
    assert tiles_per_image(config) == 1 + 4
    config = DeepseekVLV2Config(candidate_resolutions=((384, 384),))
    assert tiles_per_image(config) == 2


def test_a_tower_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="tower graphs need a vision tower on CUDA, not cpu"):
        TowerGraphs(fixture_model("tiny_mha"), max_tiles=10)
