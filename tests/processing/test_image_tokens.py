"""Image-token counting without pixels (`ImageTokenInfo`): the official processor's counts per candidate resolution and
per worked example, the tiling rule, other patch sizes, and agreement with the tensors the processor builds."""
import json

import pytest
from PIL import Image

from deepseek_vl2.processing import DeepseekVLV2Processor, ImageTokenInfo
from deepseek_vl2.processing.image_tokens import uses_tiling
from goldens import CHECKPOINTS

CONFIG = json.loads((CHECKPOINTS["tiny_mha"] / "processor_config.json").read_text())
INFO = ImageTokenInfo(tuple(tuple(r) for r in CONFIG["candidate_resolutions"]), CONFIG["patch_size"],
                      CONFIG["downsample_ratio"])

# Image tokens per candidate resolution (the official processor's counts)
TOKENS_PER_CANDIDATE = {
    (384, 384): 421, (384, 768): 631, (768, 384): 617, (384, 1152): 841, (1152, 384): 813,
    (384, 1536): 1051, (1536, 384): 1009, (768, 768): 1023, (384, 1920): 1261, (1920, 384): 1205,
    (384, 2304): 1471, (2304, 384): 1401, (768, 1152): 1429, (1152, 768): 1415, (384, 2688): 1681,
    (2688, 384): 1597, (384, 3072): 1891, (3072, 384): 1793, (768, 1536): 1835, (1536, 768): 1807,
    (384, 3456): 2101, (3456, 384): 1989, (1152, 1152): 2017,
}


def test_token_count_per_candidate():
    assert set(INFO.candidate_resolutions) == set(TOKENS_PER_CANDIDATE)
    assert len(INFO.candidate_resolutions) == 23
    for (width, height), expected in TOKENS_PER_CANDIDATE.items():
        assert INFO.resolution((width, height)) == (width, height)
        assert INFO.tokens_for_grid(width // 384, height // 384) == expected, (width, height)
        assert INFO.tokens_for_image((width, height)) == expected, (width, height)
    assert max(TOKENS_PER_CANDIDATE.values()) == 2101


# Worked examples of the official tiling: original (W, H) -> grid (nw, nh) and image tokens
WORKED_EXAMPLES = [
    ((300, 200), (1, 1), 421), ((384, 384), (1, 1), 421), ((640, 480), (2, 2), 1023), ((800, 600), (3, 2), 1415),
    ((1024, 1024), (3, 3), 2017), ((1280, 720), (4, 2), 1807), ((1920, 1080), (4, 2), 1807),
    ((500, 2000), (1, 4), 1051), ((3000, 400), (8, 1), 1793), ((4000, 3000), (3, 3), 2017),
]


@pytest.mark.parametrize("size, grid, tokens", WORKED_EXAMPLES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
def test_worked_examples(size, grid, tokens):
    assert INFO.grid(size) == grid
    assert INFO.tokens_for_image(size) == tokens
    assert INFO.tokens_for_image(size, tiling=False) == 421  # one 384 tile, whatever the size


def test_layout_of_the_count():
    # 14 x (14 + 1) global, 1 separator, (14 nh) x (14 nw + 1) local, as the official processor counts
    assert (INFO.image_size, INFO.side) == (384, 14)
    assert INFO.tokens_for_grid(2, 2) == 14 * 15 + 1 + 28 * 29
    assert INFO.tokens_for_grid(8, 1) == 210 + 1 + 14 * 113


def test_tiling_rule_counts_every_image():
    assert [uses_tiling(n) for n in range(5)] == [True, True, True, False, False]
    assert INFO.tokens_for_images([(640, 480)]) == [1023]
    assert INFO.tokens_for_images([(640, 480), (500, 2000)]) == [1023, 1051]
    assert INFO.tokens_for_images([(640, 480)] * 3) == [421, 421, 421]
    assert INFO.tokens_for_images([]) == []


def test_token_count_follows_patch_size():
    info = ImageTokenInfo(INFO.candidate_resolutions, patch_size=16, downsample_ratio=2)
    assert info.side == 12  # 384 // 16 = 24 patches -> 12 x 12 after 2x2
    assert info.tokens_for_grid(1, 1) == 12 * 13 + 1 + 12 * 13
    assert info.tokens_for_grid(2, 1) == 12 * 13 + 1 + 12 * 25
    processor = DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["tiny_mha"]), patch_size=16)
    assert processor.image_tokens.tokens_for_grid(2, 1) == 12 * 13 + 1 + 12 * 25


@pytest.mark.parametrize("sizes", [[(300, 200)], [(640, 480), (3000, 400)], [(800, 600)] * 3],
                         ids=["one", "two", "three"])
def test_counts_match_the_tensors(sizes):
    processor = DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["tiny_mha"]))
    images = [Image.new("RGB", size, (40, 90, 200)) for size in sizes]
    out = processor(prompt="<image>" * len(images), images=images, force_batchify=False)
    expected = processor.image_tokens.tokens_for_images(sizes)
    assert out.num_image_tokens == expected
    assert int(out.images_seq_mask.sum()) == sum(expected)
    tiling = uses_tiling(len(sizes))
    assert out.images_spatial_crop.tolist() == [list(processor.image_tokens.grid(s, tiling)) for s in sizes]
