"""RMSNorm as the official model computes it."""
import torch
from torch import nn

from ..kernels import dispatch


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale by `weight` in that dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps)
