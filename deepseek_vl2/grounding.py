"""Grounding answers: parse `<|ref|>`/`<|det|>` spans into boxes and draw them.

Format. Asked to ground something, the model answers with spans

    <|ref|>{label}<|/ref|><|det|>[[x1, y1, x2, y2], [x1, y1, x2, y2], ...]<|/det|>

possibly embedded in free text (`<|grounding|>` prompts); one label can carry several boxes.
Coordinates are integers normalised to 0..999 (x along the width, y along the height) with
(x1, y1) the top-left corner.

Pixels. A normalised coordinate becomes `int(x / 999 * W)` and `int(y / 999 * H)`: division by
999, not 1000, then truncation (kept from the reference, so drawings match). Box i of the whole
response (the index runs over all labels) is drawn in `BOX_COLORS[i % 13]` with an outline of
width 3, and its label in the same colour at size 20 at (x1_px, y1_px - 20), or inside the box
when that would be above the image.

Deviations from the reference:
- numbers are read with a regex, never with `eval` on model output;
- labels use Pillow's bundled scalable font (`ImageFont.load_default(size=20)`) instead of a
  proprietary font file whose absence made the reference draw nothing; that font has no CJK
  glyphs, so such labels are drawn as placeholder glyphs;
- malformed answers are tolerated instead of discarded: a `<|det|>` span without a preceding
  `<|ref|>` gets the label "", a `<|ref|>` without a `<|det|>` yields no box, an unclosed span
  runs to the next tag or the end of the text, groups with fewer than four numbers are skipped,
  coordinates are clamped into 0..999 and corners are ordered so that x1 <= x2 and y1 <= y2.
  (The reference returned None as soon as the ref and det counts differed.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont

BOX_COLORS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 255),
    (127, 127, 127), (255, 255, 127), (255, 127, 255), (127, 255, 255), (127, 127, 255),
    (127, 255, 127), (255, 127, 127),
]
BOX_OUTLINE_WIDTH = 3
LABEL_FONT_SIZE = 20
MAX_COORDINATE = 999

_TAG = re.compile(r"<\|(/?)(ref|det)\|>")
_INNERMOST_GROUP = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True)
class GroundedBox:
    """One box of a grounding answer; `box` is (x1, y1, x2, y2) normalised to 0..999."""

    label: str
    box: tuple[int, int, int, int]

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.box
        return (
            int(x1 / MAX_COORDINATE * width),
            int(y1 / MAX_COORDINATE * height),
            int(x2 / MAX_COORDINATE * width),
            int(y2 / MAX_COORDINATE * height),
        )


def _segments(text: str) -> Iterator[tuple[str | None, str]]:
    """Split `text` at ref/det tags into (opening tag kind, following text).

    The kind is "ref" or "det" for the text after an opening tag, None for text after a closing
    tag or before the first tag. An unclosed span thus runs to the next tag or the end.
    """
    kind = None
    position = 0
    for tag in _TAG.finditer(text):
        yield kind, text[position:tag.start()]
        is_closing, tag_kind = tag.groups()
        kind = None if is_closing else tag_kind
        position = tag.end()
    yield kind, text[position:]


def _clamp(number: str) -> int:
    # float() rather than int(): no digit-count limit, very long numbers just become inf.
    return int(min(max(float(number), 0.0), float(MAX_COORDINATE)))


def _parse_boxes(payload: str) -> list[tuple[int, int, int, int]]:
    """Every innermost `[...]` group with at least four numbers, as an ordered, clamped box."""
    boxes = []
    for group in _INNERMOST_GROUP.finditer(payload):
        numbers = _NUMBER.findall(group.group(1))
        if len(numbers) < 4:
            continue
        x1, y1, x2, y2 = (_clamp(n) for n in numbers[:4])
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def parse_grounding(text: str) -> list[GroundedBox]:
    """Every box of every det span in order, labelled by the ref span before it (else "")."""
    boxes = []
    label = ""
    for kind, segment in _segments(text):
        if kind == "ref":
            label = segment.strip()
        elif kind == "det":
            boxes.extend(GroundedBox(label, box) for box in _parse_boxes(segment))
            label = ""
    return boxes


def strip_grounding_tags(text: str) -> str:
    """The answer without ref/det markup: ref tags removed (label kept), det spans removed."""
    return "".join(segment for kind, segment in _segments(text) if kind != "det")


def strip_stop_words(text: str, stop_words: Iterable[str]) -> str:
    """Cut `text` at the earliest occurrence of any (non-empty) stop string, then strip it."""
    cut = len(text)
    for stop in stop_words:
        found = text.find(stop) if stop else -1
        if found != -1:
            cut = min(cut, found)
    return text[:cut].strip()


@lru_cache(maxsize=1)
def _label_font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=LABEL_FONT_SIZE)


def draw_boxes(image: Image.Image, boxes: list[GroundedBox]) -> Image.Image:
    """A copy of `image` (RGB unless it was RGBA) with each box and its label drawn on it."""
    canvas = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for index, grounded in enumerate(boxes):
        color = BOX_COLORS[index % len(BOX_COLORS)]
        x1, y1, x2, y2 = grounded.to_pixels(width, height)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=BOX_OUTLINE_WIDTH)
        label_y = y1 - LABEL_FONT_SIZE if y1 >= LABEL_FONT_SIZE else y1
        draw.text((x1, label_y), grounded.label, fill=color, font=_label_font())
    return canvas


def parse_ref_bbox(response: str, image: Image.Image) -> Image.Image | None:
    """Compatibility name: the image with the response's boxes drawn, or None if it has none."""
    boxes = parse_grounding(response)
    return draw_boxes(image, boxes) if boxes else None


def boxes_to_json(boxes: list[GroundedBox], width: int, height: int) -> list[dict]:
    """JSON-ready boxes: label, normalised box and pixel box for a `width` x `height` image."""
    return [
        {"label": b.label, "box": list(b.box), "box_pixels": list(b.to_pixels(width, height))}
        for b in boxes
    ]
