"""Image tiling: the tile resolution of an image, its global and local views, and the pixel transform.

Per image there is one global view (the image padded to `image_size` squared) and nw x nh local
crops of `image_size` squared, cut row-major from the image padded to the chosen resolution.
Padding is Pillow's `ImageOps.pad` (bicubic, centred) with the colour `int(mean * 255)` per
channel. Non-RGB PIL images are converted to RGB (a deviation: the reference fails later).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def select_best_resolution(image_size, candidate_resolutions):
    """The candidate (width, height) that keeps most of the image's pixels, then wastes least.

    `image_size` is the original (width, height). Effective pixels never credit upscaling; ties
    on both measures keep the earlier candidate.
    """
    original_width, original_height = image_size
    best_fit = None
    best_effective = 0
    best_wasted = float("inf")
    for width, height in candidate_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled_width = int(original_width * scale)
        scaled_height = int(original_height * scale)
        effective = min(scaled_width * scaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best_fit = (width, height)
            best_effective = effective
            best_wasted = wasted
    return best_fit


class ImageTransform:
    """PIL RGB image -> float32 [3, H, W] tensor in [0, 1], then `(x - mean) / std` per channel.

    The arithmetic (uint8 -> float32, divide by 255, subtract, divide) is the one of
    torchvision's ToTensor + Normalize, so the values are bit-identical to it.
    """

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), normalize=True):
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        tensor = pixels.to(torch.float32).div_(255)
        if self.normalize:
            tensor.sub_(self._mean).div_(self._std)
        return tensor


class ImageTiler:
    """PIL image + its tile resolution -> the global view, then the row-major local crops (tensors)."""

    def __init__(self, image_size: int, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize=True):
        self.image_size = image_size
        self.transform = ImageTransform(image_mean, image_std, normalize)
        self.pad_color = tuple(int(m * 255) for m in image_mean)

    def views(self, image: Image.Image, resolution) -> list:
        """`resolution` is the (width, height) the local crops are cut from (a multiple of image_size).

        The crops are cut from the padded image and transformed one by one, not transformed as one
        canvas and sliced: the pixels are the same, but turning a PIL image into an array holds the
        interpreter lock all along (about 1 ms for a 1152x1152 canvas, measured on a 2-core CPU), and a server
        prepares requests beside the thread that decodes (benchmarks/RESULTS.md, seventeenth session)."""
        size = self.image_size
        best_width, best_height = resolution
        global_view = self.transform(ImageOps.pad(image, (size, size), color=self.pad_color))
        if (best_width, best_height) == (size, size):
            return [global_view, global_view]
        canvas = ImageOps.pad(image, (best_width, best_height), color=self.pad_color)
        return [global_view] + [self.transform(canvas.crop((left, top, left + size, top + size)))
                                for top in range(0, best_height, size) for left in range(0, best_width, size)]


def rgb_images(images) -> list:
    """`images` (None, or a list / tuple of PIL images) as a list of RGB images; errors name the image index."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        raise ValueError("`images` must be a list of PIL images, got a single image; wrap it in a list")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"`images` must be a list of PIL images (or None), got {type(images).__name__}")
    return [_as_rgb(image, i) for i, image in enumerate(images)]


def _as_rgb(image, index):
    if not isinstance(image, Image.Image):
        raise ValueError(f"image {index} is a {type(image).__name__}, expected a PIL.Image.Image")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {index} is {image.width}x{image.height} pixels; width and height must be at "
                         "least 1")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"image {index} (mode {image.mode!r}) cannot be converted to RGB: {error}") from error
