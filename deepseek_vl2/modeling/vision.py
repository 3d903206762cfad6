"""The SigLIP vision tower: timm's VisionTransformer, whose parameter names are the checkpoint's
(`vision.patch_embed.proj`, `vision.blocks.{i}.attn.qkv`, ..., `vision.norm`, `vision.attn_pool.*`).

Pre-norm blocks with tanh-approximate GELU, no class token, LayerNorm eps 1e-6, attention through
SDPA (timm's fused path; docs/deviations.md#attention-runs-through-pytorch-sdpa). Features are
taken after the final LayerNorm; the MAP attention-pool head is built (its weights are in every
checkpoint) but never run.
"""
from functools import partial

from timm.models.vision_transformer import VisionTransformer
from torch import nn

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

