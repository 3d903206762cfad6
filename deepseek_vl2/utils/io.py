"""Loading helpers: conversation images, JSON files and a whole pretrained model.

Deviation from the reference: `load_pil_images` applies the EXIF orientation tag
(`PIL.ImageOps.exif_transpose`), so photos taken in portrait come out upright. Images without
an orientation tag load exactly as with `Image.open(path).convert("RGB")`.
"""

from __future__ import annotations

import json
import os

import torch
from PIL import Image, ImageOps


def load_pil_images(conversations) -> list:
    """RGB PIL images of every message's "images" list, in order, as one flat list.

    Entries are file paths or PIL images (used as they are, converted to RGB).
    Raises FileNotFoundError for a missing file and ValueError for an unreadable one, naming the
    path and the index of the message that lists it.
    """
    images = []
    for index, message in enumerate(conversations):
        for entry in message.get("images", []):
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
            f"image file not found: {os.fspath(path)!r} (listed in message {message_index})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"cannot read image {os.fspath(path)!r} (listed in message {message_index}): {error}") from error


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_pretrained_model(model_path, dtype=torch.bfloat16, device=None):
    """Load `(tokenizer, processor, model)` from a local directory or hub id.

    The weights are loaded directly in `dtype` (bf16 by default). Unlike the reference, which
    loads in float32 and then casts, this keeps the rotary-embedding buffers in float32
    (pitfall P-LM-1). The model is moved to `device` (CUDA when available, else CPU) and put in
    eval mode.
    """
    from transformers import AutoModelForCausalLM

    import deepseek_vl2  # noqa: F401  (registers the model classes with transformers)
    from deepseek_vl2.models.processing_deepseek_vl_v2 import DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, torch_dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return processor.tokenizer, processor, model
