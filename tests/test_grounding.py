"""deepseek_vl2.grounding: parsing ref/det spans (well-formed and malformed), pixels, drawing."""

from hypothesis import given, settings, strategies as st
from PIL import Image

from deepseek_vl2.grounding import (
    BOX_COLORS,
    GroundedBox,
    boxes_to_json,
    draw_boxes,
    parse_grounding,
    parse_ref_bbox,
    strip_grounding_tags,
    strip_stop_words,
)

EOS = "<｜end▁of▁sentence｜>"
README_ANSWER = f"<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>{EOS}"
WHITE = (255, 255, 255)


def boxes_of(text):
    return [(b.label, b.box) for b in parse_grounding(text)]


def test_readme_answer_in_pixels():
    (giraffe,) = parse_grounding(README_ANSWER)
    assert giraffe == GroundedBox("The giraffe at the back.", (580, 270, 999, 900))
    # int(x / 999 * W): 580.58 -> 580, 216.2 -> 216, 1000.0 -> 1000, 720.7 -> 720
    assert giraffe.to_pixels(1000, 800) == (580, 216, 1000, 720)
    assert giraffe.to_pixels(1000, 800) != (580, 216, 999, 720)  # not the /1000 rule


def test_pixels_truncate_after_dividing_by_999():
    assert GroundedBox("", (1, 998, 500, 0)).to_pixels(640, 480) == (0, 479, 320, 0)
    assert GroundedBox("", (999, 999, 999, 999)).to_pixels(7, 3) == (7, 3, 7, 3)


def test_several_labels_with_several_boxes_in_free_text():
    text = (
        "There are <|ref|>two cats<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80]]<|/det|>"
        " and <|ref|>a dog<|/ref|><|det|>[[100, 110, 120, 130]]<|/det|> on the sofa."
    )
    assert boxes_of(text) == [
        ("two cats", (10, 20, 30, 40)),
        ("two cats", (50, 60, 70, 80)),
        ("a dog", (100, 110, 120, 130)),
    ]
    assert strip_grounding_tags(text) == "There are two cats and a dog on the sofa."


def test_colour_follows_the_global_box_index():
    # 14 boxes side by side over two labels; box 13 wraps around to the first colour.
    text = "".join(
        f"<|ref|>group {g}<|/ref|><|det|>["
        + ", ".join(f"[{70 * i + 5}, 300, {70 * i + 50}, 700]" for i in indices)
        + "]<|/det|>"
        for g, indices in enumerate((range(0, 7), range(7, 14)))
    )
    boxes = parse_grounding(text)
    assert len(boxes) == 14
    image = Image.new("RGB", (1000, 200), WHITE)
    drawn = draw_boxes(image, boxes)
    assert image.getpixel((5, 100)) == WHITE  # the input is left untouched
    for index, expected in ((0, BOX_COLORS[0]), (1, BOX_COLORS[1]), (13, BOX_COLORS[0])):
        x1, y1, x2, y2 = boxes[index].to_pixels(1000, 200)
        middle = (y1 + y2) // 2
        assert drawn.getpixel((x1, middle)) == expected
        assert drawn.getpixel((x1 + 2, middle)) == expected  # outline width 3
        assert drawn.getpixel((x1 + 3, middle)) == WHITE
    assert BOX_COLORS[1] == (0, 255, 0) and BOX_COLORS[12] == (255, 127, 127) and len(BOX_COLORS) == 13


def test_label_is_drawn_above_the_box_or_inside_at_the_top():
    image = Image.new("RGB", (400, 400), WHITE)
    low = draw_boxes(image, [GroundedBox("MMMM", (250, 500, 750, 900))])
    x1, y1, x2, _ = GroundedBox("", (250, 500, 750, 900)).to_pixels(400, 400)
    above = low.crop((x1, y1 - 20, x2, y1))
    assert (255, 0, 0) in {colour for _, colour in above.getcolors(10000)}
    top = draw_boxes(image, [GroundedBox("MMMM", (250, 0, 750, 500))])
    inside = top.crop((x1 + 3, 3, x2 - 3, 20))
    assert any(colour != WHITE for _, colour in inside.getcolors(10000))


def test_non_rgb_images_and_non_latin_labels_are_drawn():
    for mode in ("L", "P", "RGBA", "1"):
        image = Image.new(mode, (50, 40))
        drawn = parse_ref_bbox("<|ref|>猫 ✓<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>", image)
        assert drawn is not None and drawn.size == (50, 40)


def test_parse_ref_bbox():
    image = Image.new("RGB", (1000, 800), WHITE)
    drawn = parse_ref_bbox(README_ANSWER, image)
    assert drawn is not image
    assert drawn.getpixel((580, 500)) == BOX_COLORS[0]
    assert image.getpixel((580, 500)) == WHITE
    assert parse_ref_bbox("A giraffe stands in front of a tree." + EOS, image) is None
    assert parse_ref_bbox("<|ref|>giraffe<|/ref|>", image) is None
    assert parse_ref_bbox("<|det|>[[1, 2]]<|/det|>", image) is None
    assert parse_ref_bbox("", image) is None


# --- malformed answers (official tracker #96 / #100) ---------------------------------------

def test_short_and_odd_length_groups_are_skipped():
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3], [10, 20, 30, 40], [5], [], [1, 2, 3, 4, 5]]<|/det|>"
    assert boxes_of(text) == [("a", (10, 20, 30, 40)), ("a", (1, 2, 3, 4))]


def test_nested_lists_and_extra_spaces():
    assert boxes_of("<|ref|>a<|/ref|><|det|>[[[1,2,3,4]]]<|/det|>") == [("a", (1, 2, 3, 4))]
    assert boxes_of("<|ref|> a <|/ref|><|det|> [ [ 1 ,2,  3 ,4 ] ,[5,6,7,8]] <|/det|>") == [
        ("a", (1, 2, 3, 4)), ("a", (5, 6, 7, 8))]
    assert boxes_of("<|ref|>a<|/ref|><|det|>[1, 2, 3, 4]<|/det|>") == [("a", (1, 2, 3, 4))]


def test_truncated_det_span():
    assert boxes_of("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]") == [
        ("a", (1, 2, 3, 4)), ("a", (5, 6, 7, 8))]
    assert boxes_of("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7") == [("a", (1, 2, 3, 4))]
    assert boxes_of("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]<|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>") == [
        ("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))]
    assert strip_grounding_tags("see <|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]") == "see a"


def test_det_without_ref_and_ref_without_det():
    assert boxes_of("<|det|>[[1, 2, 3, 4]]<|/det|>") == [("", (1, 2, 3, 4))]
    text = (
        "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|det|>[[5, 6, 7, 8]]<|/det|>"
        "<|ref|>lost<|/ref|><|ref|>c<|/ref|><|det|>[[9, 10, 11, 12]]<|/det|>"
    )
    assert boxes_of(text) == [("a", (1, 2, 3, 4)), ("", (5, 6, 7, 8)), ("c", (9, 10, 11, 12))]
    assert boxes_of("<|ref|>only a label<|/ref|>") == []
    assert boxes_of("<|/det|>[[1, 2, 3, 4]]<|/ref|>") == []


def test_non_numeric_junk():
    text = "<|ref|>a<|/ref|><|det|>[[x, y, z, w], [1, 2, foo, 3, 4], [1e, 2, 3, 4]]<|/det|>"
    assert boxes_of(text) == [("a", (1, 2, 3, 4)), ("a", (1, 2, 3, 4))]
    assert boxes_of("<|ref|>a<|/ref|><|det|>None<|/det|>") == []
    assert boxes_of("<|ref|>a<|/ref|><|det|>[[1.9, 2.5, 3.0, 4.99]]<|/det|>") == [("a", (1, 2, 3, 4))]


def test_coordinates_are_clamped():
    text = "<|det|>[[-5, 1200, 999, 99999999999999999999999999999999]]<|/det|>"
    assert boxes_of(text) == [("", (0, 999, 999, 999))]
    huge = "9" * 5000  # longer than int()'s default digit limit
    assert boxes_of(f"<|det|>[[{huge}, 0, 1, 1]]<|/det|>") == [("", (1, 0, 999, 1))]


def test_corners_are_ordered():
    assert boxes_of("<|det|>[[900, 800, 100, 200]]<|/det|>") == [("", (100, 200, 900, 800))]
    assert boxes_of("<|det|>[[100, 800, 900, 200]]<|/det|>") == [("", (100, 200, 900, 800))]


# --- text helpers and JSON ------------------------------------------------------------------

def test_strip_grounding_tags_keeps_plain_text():
    assert strip_grounding_tags("No tags here.") == "No tags here."
    assert strip_grounding_tags(README_ANSWER) == "The giraffe at the back." + EOS


def test_strip_stop_words():
    assert strip_stop_words(f"  A giraffe. {EOS}", [EOS]) == "A giraffe."
    assert strip_stop_words("one STOP two END three", ["END", "STOP"]) == "one"
    assert strip_stop_words(" nothing to cut ", [EOS, ""]) == "nothing to cut"
    assert strip_stop_words("abc", []) == "abc"


def test_boxes_to_json():
    boxes = parse_grounding(README_ANSWER + "<|det|>[[0, 0, 499, 999]]<|/det|>")
    assert boxes_to_json(boxes, 1000, 800) == [
        {"label": "The giraffe at the back.", "box": [580, 270, 999, 900], "box_pixels": [580, 216, 1000, 720]},
        {"label": "", "box": [0, 0, 499, 999], "box_pixels": [0, 0, 499, 800]},
    ]
    assert boxes_to_json([], 10, 10) == []


# --- property: any text parses without raising ----------------------------------------------

FRAGMENTS = st.sampled_from(
    ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "[", "]", ",", " ", "-", ".", "0", "7", "99",
     "999", "1000", "a", "Z", "猫", EOS, "<|", "|>"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(FRAGMENTS, st.text(max_size=5)), max_size=40).map("".join))
def test_parser_never_raises(text):
    boxes = parse_grounding(text)
    for grounded in boxes:
        x1, y1, x2, y2 = grounded.box
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
        assert all(type(c) is int for c in grounded.box)
    assert isinstance(strip_grounding_tags(text), str)
    drawn = parse_ref_bbox(text, Image.new("RGB", (16, 12)))
    assert (drawn is None) == (not boxes)
