"""Draws the demo images in this folder (simple generated scenes, free to ship).

    python images/make_demo_images.py
"""
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def scene(size, sky, ground, fruits, marked=None):
    """A horizon, round 'fruits' (x, y, radius, colour) and optionally a red box around one."""
    w, h = size
    image = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(h * 0.62), w, h), fill=ground)
    draw.ellipse((int(w * 0.72), int(h * 0.06), int(w * 0.86), int(h * 0.06) + int(w * 0.14)), fill=(255, 221, 87))
    for x, y, r, colour in fruits:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(40, 40, 40), width=2)
        draw.line((x, y - r, x + r // 4, y - r - r // 2), fill=(90, 60, 20), width=4)
    if marked is not None:
        x, y, r, _ = fruits[marked]
        draw.rectangle((x - r - 10, y - r - 24, x + r + 10, y + r + 10), outline=(255, 0, 0), width=5)
    return image


def main():
    scene((800, 600), (135, 190, 235), (96, 160, 72),
          [(180, 430, 60, (220, 30, 40)), (390, 450, 45, (250, 150, 20)), (600, 420, 70, (120, 200, 60))],
          marked=1).save(HERE / "incontext_visual_grounding_1.jpeg", quality=92)
    scene((640, 480), (200, 220, 240), (150, 120, 90),
          [(120, 360, 40, (120, 200, 60)), (300, 340, 55, (250, 150, 20)), (480, 370, 35, (220, 30, 40))]
          ).save(HERE / "icl_vg_2.jpeg", quality=92)
    scene((1024, 768), (250, 200, 160), (70, 120, 60),
          [(250, 560, 90, (220, 30, 40)), (520, 590, 70, (250, 150, 20)), (780, 560, 100, (120, 200, 60))]
          ).save(HERE / "vqa_1.jpg", quality=92)


if __name__ == "__main__":
    main()
