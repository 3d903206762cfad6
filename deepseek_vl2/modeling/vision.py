"""The SigLIP vision tower: timm's VisionTransformer, whose parameter names are the checkpoint's
(`vision.patch_embed.proj`, `vision.blocks.{i}.attn.qkv`, ..., `vision.norm`, `vision.attn_pool.*`).

Pre-norm blocks with tanh-approximate GELU, no class token, LayerNorm eps 1e-6, attention through
SDPA (timm's fused path; docs/deviations.md#attention-runs-through-pytorch-sdpa). Features are
taken after the final LayerNorm; the MAP attention-pool head is built (its weights are in every
checkpoint) but never run.

`TowerPieces` runs the same features a few blocks at a time, for a caller that interleaves other
work between the pieces (the continuous engine's decode steps).
"""
from functools import partial
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..kernels import dispatch
from .vl_config import VisionEncoderConfig


def build_vision_tower(config: VisionEncoderConfig) -> VisionTransformer:
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.layers,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        class_token=config.class_token,
        global_pool=config.global_pool,
        num_classes=config.num_classes,
        act_layer=partial(nn.GELU, approximate="tanh"),
        weight_init="skip",
        dynamic_img_size=False,
    )


def tower_features(tower: VisionTransformer, tiles: torch.Tensor) -> torch.Tensor:
    """Features [tiles, patches, width] after the final LayerNorm."""
    with dispatch.sdpa_backends(tiles):
        return tower.forward_features(tiles)


class TowerPieces:
    """`tower_features(tower, tiles)` in pieces: `advance(n)` runs the next n blocks (the patch and
    position embedding before the first, the final LayerNorm after the last), the same operations in
    the same order as timm's forward_features, so the features are the same to the bit."""

    def __init__(self, tower: VisionTransformer, tiles: torch.Tensor):
        self.tower = tower
        self.hidden = tiles
        self.next_block = None  # None: not embedded yet
        self.features: Optional[torch.Tensor] = None

    @property
    def blocks_left(self) -> int:
        return len(self.tower.blocks) - (self.next_block or 0)

    def advance(self, blocks: int) -> Optional[torch.Tensor]:
        """Run up to `blocks` (>= 1) more blocks; the features once the last has run, else None."""
        if self.features is not None:
            return self.features
        tower, x = self.tower, self.hidden
        with dispatch.sdpa_backends(x):
            if self.next_block is None:
                x = tower.norm_pre(tower.patch_drop(tower._pos_embed(tower.patch_embed(x))))
                self.next_block = 0
            end = min(self.next_block + max(blocks, 1), len(tower.blocks))
            for block in tower.blocks[self.next_block:end]:
                x = block(x)
            self.next_block = end
            if end == len(tower.blocks):
                self.features, x = tower.norm(x), None
        self.hidden = x
        return self.features
