"""Tokenization with images: text with `<image>` tags + PIL images -> ids, image mask, tiles, grids.

Each tag becomes the image's block of `image_token_id` copies (its count from `ImageTokenInfo`);
the text pieces between tags are tokenized separately, so BPE merges never cross an image. The
newline and separator slots of a block carry the same id. Both are as in the official processor.

The processor may be called from several threads at once (the server prepares requests in a thread
pool): the tokenizer is used under a lock (transformers' fast tokenizers are not safe for
concurrent calls), the images are tiled outside it.
"""

from __future__ import annotations

import threading

from .image_tokens import ImageTokenInfo
from .tiling import ImageTiler


class ImageTextTokenizer:
    """The processor's tokenizer plus its image settings: `encode`, `decode`, `tokenize_with_images`."""

    def __init__(self, tokenizer, image_token: str, image_token_id: int, token_info: ImageTokenInfo,
                 tiler: ImageTiler):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.token_info = token_info
        self.tiler = tiler
        self._lock = threading.Lock()  # around every call into the tokenizer

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        with self._lock:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if bos:
            ids = [self.tokenizer.bos_token_id] + ids
        if eos:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def decode(self, ids, **kwargs) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, **kwargs)

    def image_block(self, image, tiling: bool = True):
        """(views, [nw, nh], image-token count) of one PIL image."""
        resolution = self.token_info.resolution(image.size, tiling)
        grid = [resolution[0] // self.tiler.image_size, resolution[1] // self.tiler.image_size]
        return self.tiler.views(image, resolution), grid, self.token_info.tokens_for_grid(*grid)

    def tokenize_with_images(self, text: str, images, bos=True, eos=True, cropping=True):
        """Tokenize `text`, replacing each image tag (`image_token`, "<image>") by the image's
        token block. Text pieces between tags are tokenized separately.

        Returns `(ids, tiles, images_seq_mask, spatial_crops, num_image_tokens)` as lists.
        """
        tag = self.image_token
        pieces = text.split(tag)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"the text has {len(pieces) - 1} {tag} tags but {len(images)} images "
                f"were given; pass one image per {tag} tag")

        ids, seq_mask, tiles, spatial_crops, num_image_tokens = [], [], [], [], []
        for piece, image in zip(pieces, images):
            piece_ids = self.encode(piece, bos=False, eos=False)
            ids += piece_ids
            seq_mask += [False] * len(piece_ids)

            views, grid, count = self.image_block(image, cropping)
            tiles += views
            spatial_crops.append(grid)
            num_image_tokens.append(count)
            ids += [self.image_token_id] * count
            seq_mask += [True] * count

        last_ids = self.encode(pieces[-1], bos=False, eos=False)
        ids += last_ids
        seq_mask += [False] * len(last_ids)
        if bos:
            ids = [self.tokenizer.bos_token_id] + ids
            seq_mask = [False] + seq_mask
        if eos:
            ids = ids + [self.tokenizer.eos_token_id]
            seq_mask = seq_mask + [False]
        return ids, tiles, seq_mask, spatial_crops, num_image_tokens
