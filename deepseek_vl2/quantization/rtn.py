"""Round-to-nearest quantization along the last dim (the input columns) of a weight [..., N, K],
row by row, and its inverse. Any leading dims (stacked experts) are just more rows.

    int8   q = clamp(round(w / s), -127, 127) int8,      s = max|w_row| / 127          w ~ q * s
    int4   q = clamp(round((w - z) / s), 0, 15),         s = (max - min) / 15,         w ~ q * s + z
           per group of `group` columns, z = min;        two q per byte, the even column in the low
           nibble: packed[..., j] = q[..., 2j] | q[..., 2j+1] << 4

The int4 zero point is a float in the weights' domain (as in torchao's and gpt-fast's int4
weight-only layouts, which keep the group's midpoint where this keeps its minimum: the rounding is
then exactly textbook min/max RTN, ties included), so dequantizing is one multiply-add. Scales and
zero points are stored in the activation dtype and the rounding uses the stored (rounded) values,
so the error of a weight is at most half a step away from the clamped range.
"""
from typing import Optional, Tuple

import torch


def quantize(weight: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """weight [..., K] -> (q, scale, zero): int8 q [..., K] with scale [..., 1] and no zero, or int4
    q packed as uint8 [..., K/2] with scale and zero [..., K/group]. Computed in float32 on the
    weight's device."""
    w = weight.float()
    K = w.shape[-1]
    if bits == 8:
        scale = (w.abs().amax(dim=-1, keepdim=True) / 127).to(scale_dtype)
        q = (w / _nonzero(scale)).round_().clamp_(-127, 127).to(torch.int8)
        return q, scale, None
    if bits != 4 or K % group or group % 2:
        raise ValueError(f"cannot quantize {K} columns to {bits} bits in groups of {group}")
    groups = w.reshape(*w.shape[:-1], K // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).to(scale_dtype)
    zero = low.to(scale_dtype)
    q = ((groups - zero.float()[..., None]) / _nonzero(scale)[..., None]).round_().clamp_(0, 15)
    q = q.to(torch.uint8).reshape(w.shape)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weight [..., K] in `dtype` (computed in float32, rounded once) from `quantize`'s output."""
    if zero is None:
        return (q.float() * scale.float()).to(dtype)
    values = unpack_int4(q).float()
    groups = values.reshape(*scale.shape, -1)
    out = groups * scale.float()[..., None] + zero.float()[..., None]
    return out.reshape(values.shape).to(dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> the int4 values 0..15 as uint8 [..., K]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """The scale in float32 with zeros (an all-zero row or group, or a scale below the dtype's range)
    replaced by 1: its values then round to the zero point, or to 0."""
    s = scale.float()
    return torch.where(s > 0, s, torch.ones_like(s))
