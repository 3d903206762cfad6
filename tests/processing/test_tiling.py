"""Image tiling: the tile resolution of each worked example, views (global, then row-major local crops,
grey padding), the <= 2 images tiling rule, and non-RGB input."""
import pytest
import torch
from PIL import Image

from deepseek_vl2.processing import DeepseekVLV2Processor, ImageTransform, select_best_resolution
from deepseek_vl2.processing.tiling import ImageTiler
from goldens import CHECKPOINTS


@pytest.fixture(scope="module")
def proc():
    return DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["tiny_mha"]))


# The official tiling examples: (W, H) -> best, (nw, nh), tiles incl. global, tokens, global content, local content
TILING_TABLE = [
    ((300, 200), (384, 384), (1, 1), 2, 421, (384, 256), (384, 256)),
    ((384, 384), (384, 384), (1, 1), 2, 421, (384, 384), (384, 384)),
    ((640, 480), (768, 768), (2, 2), 5, 1023, (384, 288), (768, 576)),
    ((800, 600), (1152, 768), (3, 2), 7, 1415, (384, 288), (1024, 768)),
    ((1024, 1024), (1152, 1152), (3, 3), 10, 2017, (384, 384), (1152, 1152)),
    ((1280, 720), (1536, 768), (4, 2), 9, 1807, (384, 216), (1365, 768)),
    ((1920, 1080), (1536, 768), (4, 2), 9, 1807, (384, 216), (1365, 768)),
    ((500, 2000), (384, 1536), (1, 4), 5, 1051, (96, 384), (384, 1536)),
    ((3000, 400), (3072, 384), (8, 1), 9, 1793, (384, 51), (2880, 384)),
    ((4000, 3000), (1152, 1152), (3, 3), 10, 2017, (384, 288), (1152, 864)),
]


def content_size(view):
    """(width, height) of the white area in a normalised view padded with grey."""
    white = view[0] > 0.5
    return int(white.any(0).sum()), int(white.any(1).sum())


@pytest.mark.parametrize("row", TILING_TABLE, ids=lambda row: f"{row[0][0]}x{row[0][1]}")
def test_tiling_worked_examples(proc, row):
    size, best, grid, n_tiles, n_tokens, global_content, local_content = row
    assert select_best_resolution(size, proc.candidate_resolutions) == best
    image = Image.new("RGB", size, (255, 255, 255))
    ids, tiles, seq_mask, crops, counts = proc.tokenize_with_images("<image>", [image], bos=False, eos=False)
    assert crops == [list(grid)]
    assert len(tiles) == n_tiles
    assert counts == [n_tokens] and len(ids) == n_tokens and all(seq_mask)
    assert content_size(tiles[0]) == global_content
    nw, nh = grid
    local = torch.stack(tiles[1:]).view(nh, nw, 3, 384, 384).permute(2, 0, 3, 1, 4).reshape(3, nh * 384, nw * 384)
    assert content_size(local) == local_content
    if local_content != (nw * 384, nh * 384):  # centred content: the corner is pad colour 127
        assert torch.allclose(local[:, 0, 0], torch.full((3,), (127 / 255 - 0.5) / 0.5))


def test_local_tiles_are_row_major(proc):
    # 768x768 image with four coloured quadrants -> 2x2 grid, tiles in row-major order
    image = Image.new("RGB", (768, 768))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for (x, y), colour in zip([(0, 0), (384, 0), (0, 384), (384, 384)], colours):
        image.paste(colour, (x, y, x + 384, y + 384))
    _, tiles, _, crops, _ = proc.tokenize_with_images("<image>", [image], bos=False, eos=False)
    assert crops == [[2, 2]]
    for tile, colour in zip(tiles[1:], colours):
        expected = (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.5
        assert torch.equal(tile[:, 192, 192], expected)


def test_select_best_resolution_ties_keep_first():
    assert select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution((100, 100), [(768, 384), (384, 384)]) == (384, 384)
    # exact-size images choose their own candidate
    assert select_best_resolution((384, 3456), [(384, 384), (384, 3456), (3456, 384)]) == (384, 3456)


def test_more_than_two_images_disable_tiling(proc):
    images = [Image.new("RGB", (640, 480), colour) for colour in [(200, 10, 10), (10, 200, 10), (10, 10, 200)]]
    out = proc(prompt="<image><image><image>", images=images, force_batchify=False)
    assert out.num_image_tokens == [421, 421, 421]
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert out.images.shape[0] == 6
    for i in range(3):
        assert torch.equal(out.images[2 * i], out.images[2 * i + 1])  # local tile == global view
    two = proc(prompt="<image><image>", images=images[:2], force_batchify=False)
    assert two.num_image_tokens == [1023, 1023]


def test_non_rgb_images_are_converted(proc):
    rgb = Image.new("RGB", (300, 200), (10, 120, 240))
    out_rgb = proc(prompt="<image>", images=[rgb], force_batchify=False)
    for image in [rgb.convert("RGBA"), rgb.convert("P"), Image.new("L", (300, 200), 90)]:
        out = proc(prompt="<image>", images=[image], force_batchify=False)
        assert out.images.shape == out_rgb.images.shape
        assert torch.equal(out.images, proc(prompt="<image>", images=[image.convert("RGB")],
                                            force_batchify=False).images)
    assert torch.equal(proc(prompt="<image>", images=[rgb.convert("RGBA")], force_batchify=False).images,
                       out_rgb.images)



def test_image_transform_maps_to_minus_one_one():
    image = Image.new("RGB", (2, 1))
    image.putpixel((1, 0), (255, 127, 0))
    tensor = ImageTransform()(image)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert tensor[:, 0, 1].tolist() == pytest.approx([1.0, 127 / 255 * 2 - 1, -1.0])
    assert ImageTransform(normalize=False)(image)[:, 0, 1].tolist() == pytest.approx([1.0, 127 / 255, 0.0])


def test_tiler_pads_with_the_truncated_mean_colour():
    tiler = ImageTiler(384)
    assert tiler.pad_color == (127, 127, 127)  # int(0.5 * 255) from the mean, as the official processor
    views = tiler.views(Image.new("RGB", (384, 192), (255, 255, 255)), (384, 384))
    assert len(views) == 2 and all(view.shape == (3, 384, 384) for view in views)
    assert torch.equal(views[0], views[1])  # a 1x1 grid: the local tile is the global view
    assert views[0][0, 0, 0].item() == pytest.approx((127 / 255 - 0.5) / 0.5)
    assert views[0][0, 192, 0].item() == 1.0
