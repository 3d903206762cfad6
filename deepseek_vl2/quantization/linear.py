"""QuantizedLinear: a linear layer whose weight is a QuantizedWeight (the bias, if any, stays in the
activation dtype). Which kernel runs is dispatch.quantized_linear's choice."""
from typing import Optional

import torch
from torch import nn

from ..kernels import dispatch
from .config import QuantizationConfig
from .weight import QuantizedWeight


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantizedWeight((out_features, in_features), config, dtype, device)
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.quantized_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
