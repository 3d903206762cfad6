"""Image-token counting: how many `<image>` ids an image of a given size takes, without its pixels.

An image becomes `N_img = h*(w+1) + 1 + (nh*h)*(nw*w+1)` ids: the global view's h rows of w
vectors plus a newline each, one view separator, then the local grid's nh*h rows of nw*w vectors
plus a newline each (h = w = 14 for the released checkpoints: ceil((384 // 14) / 2)). The grid
(nw, nh) comes from `select_best_resolution`; tiling applies only when the whole call has at most
two images (kept from the official processor: docs/deviations.md#kept-on-purpose), otherwise every
image is one tile of `image_size` (421 ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .tiling import select_best_resolution

MAX_IMAGES_FOR_TILING = 2


def uses_tiling(image_count: int) -> bool:
    """Whether a call with `image_count` images (all of them, used by a tag or not) tiles them."""
    return image_count <= MAX_IMAGES_FOR_TILING


@dataclass(frozen=True)
class ImageTokenInfo:
    """The token-count side of the processor settings; every method takes sizes, never pixels."""

    candidate_resolutions: tuple
    patch_size: int
    downsample_ratio: float

    @property
    def image_size(self) -> int:
        """Side of one tile: the width of the first candidate, as in the official processor."""
        return self.candidate_resolutions[0][0]

    @property
    def side(self) -> int:
        """Vectors per tile row (and rows per tile) after the projector's downsampling."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def resolution(self, image_size, tiling: bool = True) -> tuple:
        """The padded (width, height) an image of `image_size` (width, height) is cut from."""
        if not tiling:
            return (self.image_size, self.image_size)
        return select_best_resolution(image_size, self.candidate_resolutions)

    def grid(self, image_size, tiling: bool = True) -> tuple:
        """(nw, nh): the local tiles across and down for an image of `image_size` (width, height)."""
        width, height = self.resolution(image_size, tiling)
        return (width // self.image_size, height // self.image_size)

    def tokens_for_grid(self, num_width_tiles: int, num_height_tiles: int) -> int:
        """Image ids of one image with an nw x nh local grid: global rows + newlines, separator, local rows."""
        side = self.side
        global_tokens = side * (side + 1)
        local_tokens = (num_height_tiles * side) * (num_width_tiles * side + 1)
        return global_tokens + 1 + local_tokens

    def tokens_for_image(self, image_size, tiling: bool = True) -> int:
        """Image ids of one image of `image_size` (width, height)."""
        return self.tokens_for_grid(*self.grid(image_size, tiling))

    def tokens_for_images(self, image_sizes) -> list:
        """Image ids of each image of one call, the tiling rule applied to their number."""
        tiling = uses_tiling(len(image_sizes))
        return [self.tokens_for_image(size, tiling) for size in image_sizes]
