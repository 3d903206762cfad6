"""Loading helpers: conversation images, JSON files and a whole pretrained model.

Deviation from the reference: `load_pil_images` applies the EXIF orientation tag
(`PIL.ImageOps.exif_transpose`), so photos taken in portrait come out upright. Images without
an orientation tag load exactly as with `Image.open(path).convert("RGB")`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from PIL import Image, ImageOps


def load_pil_images(conversations) -> list:
    """RGB PIL images of every message's "images" list, in order, as one flat list.

    Entries are file paths or PIL images (used as they are, converted to RGB); a missing or None
    "images" means none. Raises FileNotFoundError for a missing file, ValueError for an unreadable
    one, and TypeError for values of the wrong type, naming the message (and image) index.
    """
    if not isinstance(conversations, (list, tuple)):
        raise TypeError(f"`conversations` must be a list of message dicts, got {type(conversations).__name__}")
    images = []
    for index, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {index} of `conversations` is a {type(message).__name__}, expected a dict")
        entries = message.get("images") or []
        if not isinstance(entries, (list, tuple)):
            raise TypeError(f"message {index}: 'images' must be a list of file paths or PIL images, got "
                            f"{type(entries).__name__}")
        for number, entry in enumerate(entries):
            if not (isinstance(entry, (Image.Image, str, bytes, os.PathLike)) or hasattr(entry, "read")):
                raise TypeError(f"message {index}, image {number}: expected a file path or a PIL image, got "
                                f"{type(entry).__name__}")
            if isinstance(entry, Image.Image):
                images.append(entry if entry.mode == "RGB" else entry.convert("RGB"))
            else:
                images.append(_open_rgb(entry, index))
    return images


def _open_rgb(path, message_index) -> Image.Image:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"image file not found: {_name(path)} (listed in message {message_index})") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot read image {_name(path)} (listed in message {message_index}): {error}") from error


def _name(path) -> str:
    return repr(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else f"<{type(path).__name__}>"


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_pretrained_model(model_path, dtype=torch.bfloat16, device=None):
    """Load `(tokenizer, processor, model)` from a local directory or hub id.

    The same loading path as `ChatEngine.load` (`deepseek_vl2.engine.load_model_and_processor`),
    with the reference's bf16 default: the weights are loaded directly in `dtype`. Unlike the
    reference, which loads in float32 and then casts, this keeps the rotary-embedding buffers in
    float32 (docs/deviations.md#load_pretrained_model-loads-directly-in-bfloat16). The model is
    placed on `device` (CUDA when available, else CPU) and put in eval mode.
    """
    from deepseek_vl2.engine.loading import load_model_and_processor

    processor, model = load_model_and_processor(model_path, device=device, dtype=dtype)
    return processor.tokenizer, processor, model
