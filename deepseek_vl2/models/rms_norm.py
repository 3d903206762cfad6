"""RMSNorm as the reference computes it (spec language_model.md §2)."""
import torch
from torch import nn

from . import triton_norm_rope


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale by `weight` in that dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_norm_rope.applies(x):  # one kernel instead of eight
            return triton_norm_rope.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
