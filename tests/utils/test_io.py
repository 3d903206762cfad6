"""deepseek_vl2.utils.io: image loading (EXIF, errors, modes, fixture hashes) and load_json."""

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl2.utils.io import load_json, load_pil_images
from image_helpers import decompression_bomb_png

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPEC = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))


def fixture_conversations():
    """(case label, conversation with absolute paths, expected loaded_images) for every case."""
    for case in SPEC["cases"]:
        if case["kind"] == "single":
            yield case["name"], case["conversation"], case["expected"]["loaded_images"]
        elif case["kind"] == "batch":
            for i, sample in enumerate(case["samples"]):
                yield f"{case['name']}.s{i}", sample["conversation"], case["expected"]["samples"][i]["loaded_images"]


FIXTURE_CONVERSATIONS = list(fixture_conversations())


@pytest.mark.parametrize("label, conversation, expected", FIXTURE_CONVERSATIONS,
                         ids=[c[0] for c in FIXTURE_CONVERSATIONS])
def test_fixture_images_match_official_loads(label, conversation, expected):
    conversation = [dict(m, images=[str(FIXTURES / p) for p in m["images"]]) if "images" in m else m
                    for m in conversation]
    images = load_pil_images(conversation)
    assert len(images) == len(expected)
    for image, want in zip(images, expected):
        assert image.mode == want["mode"]
        assert list(image.size) == want["size"]
        assert hashlib.sha256(image.tobytes()).hexdigest() == want["sha256"]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 20))  # blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)
    (loaded,) = load_pil_images([{"role": "<|User|>", "content": "<image>", "images": [str(path)]}])
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((10, 2))  # the left band ends up at the top
    assert blue > 150 and red < 100


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere.png"
    conversation = [{"role": "system", "content": "x"},
                    {"role": "<|User|>", "content": "<image>", "images": [str(missing)]}]
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png.*message 1"):
        load_pil_images(conversation)


def test_corrupt_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=r"cannot read image .*garbage\.png.*message 0.*cannot identify"):
        load_pil_images([{"role": "<|User|>", "content": "<image>", "images": [str(garbage)]}])


def test_truncated_file(tmp_path):
    data = (FIXTURES / "images" / "p01_640x480.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.png"):
        load_pil_images([{"role": "<|User|>", "content": "<image>", "images": [str(truncated)]}])


def test_decompression_bomb(tmp_path):
    """A PNG whose header claims 100000 x 100000 pixels: PIL refuses it before decoding, and the
    error names the file and its message like any unreadable image."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb_png())
    with pytest.raises(ValueError, match=r"cannot read image .*bomb\.png.*message 0.*decompression bomb"):
        load_pil_images([{"role": "<|User|>", "content": "<image>", "images": [str(bomb)]}])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_non_rgb_files_and_objects_become_rgb(tmp_path, mode):
    source = Image.new("RGB", (16, 12), (10, 120, 240))
    source.paste((250, 250, 0), (0, 0, 8, 6))
    image = source.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    from_file, from_object = load_pil_images([{"role": "<|User|>", "images": [str(path), image]}])
    assert from_file.mode == from_object.mode == "RGB"
    assert from_object.tobytes() == image.convert("RGB").tobytes()
    if mode != "CMYK":  # lossless formats round-trip exactly
        assert from_file.tobytes() == image.convert("RGB").tobytes()


def test_rgb_objects_pass_through_and_order_is_kept(tmp_path):
    first = Image.new("RGB", (5, 5), (1, 2, 3))
    path = tmp_path / "second.png"
    Image.new("RGB", (7, 3), (4, 5, 6)).save(path)
    conversation = [{"role": "<|User|>", "images": [first]}, {"role": "<|Assistant|>", "content": ""},
                    {"role": "<|User|>", "images": [path]}]
    loaded = load_pil_images(conversation)
    assert loaded[0] is first
    assert loaded[1].size == (7, 3) and loaded[1].getpixel((0, 0)) == (4, 5, 6)
    assert load_pil_images([{"role": "<|User|>", "content": "text only"}]) == []


def test_load_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"a": [1, 2], "text": "café"}, ensure_ascii=False), encoding="utf-8")
    assert load_json(path) == {"a": [1, 2], "text": "café"}
