"""The projector from vision features to the language model's embedding space.

`downsample_mlp_gelu` (every release): the 27x27 feature grid is zero-padded on the bottom and right
to 28x28, each 2x2 window is concatenated channel-major (element c*4 + dr*2 + dc, the order
`F.unfold` produces), and an MLP maps the 4*1152 values to the language width.
"""
import math

import torch
from torch import nn

from .vl_config import MlpProjectorConfig

PROJECTOR_TYPES = ("identity", "linear", "mlp_gelu", "downsample_mlp_gelu")


class MlpProjector(nn.Module):
    def __init__(self, config: MlpProjectorConfig):
        super().__init__()
        kind = config.projector_type
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {kind!r} is not supported; expected one of {PROJECTOR_TYPES}")
        self.downsample = config.downsample_ratio if kind == "downsample_mlp_gelu" else 1
        n = config.n_embed
        if kind == "identity":
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(config.input_dim, n)
        elif kind == "mlp_gelu":
            layers = [nn.Linear(config.input_dim, n)]
            for _ in range(config.depth - 1):
                layers += [nn.GELU(), nn.Linear(n, n)]
            self.layers = nn.Sequential(*layers)
        else:
            wide = n * config.mlp_ratio
            layers = [nn.Linear(config.input_dim * self.downsample**2, wide)]
            for _ in range(config.depth - 2):
                layers += [nn.GELU(), nn.Linear(wide, wide)]
            layers += [nn.GELU(), nn.Linear(wide, n)]
            self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, tokens, input_dim] -> [N, tokens / r^2 (rounded up per side), n_embed]."""
        if self.downsample > 1:
            features = merge_windows(features, self.downsample)
        return self.layers(features)


def merge_windows(features: torch.Tensor, r: int) -> torch.Tensor:
    """[N, side*side, C] -> [N, ceil(side/r)^2, C*r*r]: zero-pad the grid to a multiple of r on the
    bottom/right, then concatenate each r x r window channel-major."""
    N, tokens, C = features.shape
    side = math.isqrt(tokens)
    padded_side = -(-side // r) * r
    grid = features.view(N, side, side, C)
    if padded_side != side:
        grid = nn.functional.pad(grid, (0, 0, 0, padded_side - side, 0, padded_side - side))
    out_side = padded_side // r
    windows = grid.view(N, out_side, r, out_side, r, C).permute(0, 1, 3, 5, 2, 4)  # N, R, Cc, C, dr, dc
    return windows.reshape(N, out_side * out_side, C * r * r)
