"""The official package's `deepseek_vl2.serve.app_modules.utils` names that users import:
`parse_ref_bbox` and `strip_stop_words` (from `deepseek_vl2.grounding`) and `pil_to_base64`.

Deviation from the reference: `pil_to_base64` labels the data with the format it was encoded in
(`data:image/jpeg` for the default JPEG; the reference said image/png;
docs/deviations.md#pil_to_base64-labels-jpeg-data-as-jpeg).
"""
import base64
import html
import io

from PIL import Image

from ...grounding import parse_ref_bbox, strip_stop_words

__all__ = ["parse_ref_bbox", "pil_to_base64", "strip_stop_words"]


def pil_to_base64(image: Image.Image, alt: str = "", resize: bool = True, max_size: int = 800, min_size: int = 400,
                  format: str = "JPEG", quality: int = 95) -> str:
    """An `<img>` tag holding `image` as a base64 data: URL. With `resize`, the short side becomes
    int(min(max_size / aspect, min_size, short side)) and the long side int(short * aspect), where
    aspect = long / short, keeping the orientation (so images are only ever scaled down)."""
    if resize:
        width, height = image.size
        long_side, short_side = max(width, height), min(width, height)
        aspect = long_side / short_side
        new_short = int(min(max_size / aspect, min_size, short_side))
        new_long = int(new_short * aspect)
        image = image.resize((new_long, new_short) if width >= height else (new_short, new_long))
    encoding = "JPEG" if format.upper() == "JPG" else format.upper()
    if encoding == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=encoding, quality=quality)
    mime = Image.MIME.get(encoding, f"image/{encoding.lower()}")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(alt)}" />'
