"""QuantizedWeight: the stand-in for one full-precision weight, 2-D [N, K] (a linear layer) or stacked
3-D [E, N, K] (a layer's experts), quantized row by row along K (rtn.py).

Its parameters (integer ones without gradients) are what a quantized checkpoint stores:
    qweight  int8 [..., N, K], or uint8 [..., N, K/2] for int4 (two values per byte)
    scale    [..., N, K/group] in the activation dtype (int8: group = K, one scale per row)
    zero     [..., N, K/group] in the activation dtype (int4 only)
They are parameters, not buffers, so device placement, `.to()`, memory planning and strict loading
treat them as every other weight. `write` quantizes full-precision rows into any slice of the
leading dims and rows (how a checkpoint's tensors arrive: one expert, or the gate half of a fused
projection, at a time).
"""
from typing import Tuple

import torch
from torch import nn

from . import rtn
from .config import QuantizationConfig

STORED = ("qweight", "scale", "zero")  # parameter names, in the order a checkpoint lists them


class QuantizedWeight(nn.Module):
    def __init__(self, shape: Tuple[int, ...], config: QuantizationConfig, dtype: torch.dtype, device=None):
        super().__init__()
        *lead, N, K = shape
        self.shape = tuple(shape)
        self.scheme = config.scheme
        self.bits = config.bits
        self.group = config.group_for(K)
        groups = K // self.group
        qdtype, qwidth = (torch.int8, K) if self.bits == 8 else (torch.uint8, K // 2)
        self.qweight = nn.Parameter(torch.empty(*lead, N, qwidth, dtype=qdtype, device=device), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(*lead, N, groups, dtype=dtype, device=device), requires_grad=False)
        if self.bits == 4:
            self.zero = nn.Parameter(torch.empty(*lead, N, groups, dtype=dtype, device=device), requires_grad=False)
        else:
            self.zero = None

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (what `dequantize` returns by default)."""
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def stored_width(self, name: str) -> int:
        """Last-dim size of a stored parameter."""
        return getattr(self, name).shape[-1]

    @torch.no_grad()
    def write(self, index: tuple, weight: torch.Tensor) -> None:
        """Quantize full-precision `weight` (the shape of a [index] slice of the full weight) into
        that slice; `index` selects leading dims and rows, never columns."""
        if len(index) >= len(self.shape) or any(not isinstance(i, (int, slice)) for i in index):
            raise ValueError(f"internal error: quantized weights are written by rows, not with index {index}")
        q, scale, zero = rtn.quantize(weight.to(self.device), self.bits, self.group, self.scale.dtype)
        self.qweight[index] = q
        self.scale[index] = scale
        if zero is not None:
            self.zero[index] = zero

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The full weight in `dtype` (default: the activation dtype), in PyTorch ops."""
        return rtn.dequantize(self.qweight, self.scale, self.zero, dtype or self.dtype)

    def extra_repr(self) -> str:
        group = "" if self.bits == 8 else f", group={self.group}"
        return f"{self.scheme}, shape={list(self.shape)}{group}"
