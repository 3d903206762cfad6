"""Checkpoint names: the one map from each official tensor name to the part of this library's
parameters that holds it.

The official format has one tensor per official key, e.g.
`language.model.layers.3.mlp.experts.17.up_proj.weight`. Some of this library's parameters fuse or
stack several official tensors (q/k/v, gate/up, all experts of a layer); a module that does so says
how through `checkpoint_keys()`: official name suffix -> `OfficialSlice` (its parameter, the index
into it, and for an official tensor that is that slice permuted and reshaped, the permutation and
the official shape: the shared experts, stored as extra experts). `checkpoint_layout(model)`
collects that into one map for the whole model; every other parameter is its own official tensor.

A quantized weight (quantization/weight.py) stands where its full-precision parameter stood: the
official names map onto it as before, and loading quantizes each tensor into its slice.
`stored_layout` is the map of a quantized checkpoint, which keeps the official names with the
stored parts as suffixes (`<official name>.qweight`, `.scale`, `.zero`), each the same slice of the
stored parameter.
"""
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..quantization.weight import STORED, QuantizedWeight


class OfficialSlice(NamedTuple):
    """Where one official tensor lives: `param[index]`, permuted by `permute` and reshaped to `shape`
    when those are given."""

    param: str
    index: tuple = ()
    permute: Optional[Tuple[int, ...]] = None
    shape: Optional[Tuple[int, ...]] = None


Layout = Dict[str, OfficialSlice]  # official name -> where it lives


def stacked_rows(param: str, parts: Sequence[Tuple[str, int]], bias: bool = False) -> Layout:
    """The official names of a linear layer that holds several official ones stacked by output rows:
    `parts` are (official layer name, rows) in order; each `<name>.weight` (and `<name>.bias` with
    `bias`) is its consecutive slice of `<param>.weight` (`<param>.bias`)."""
    keys, start = {}, 0
    for name, rows in parts:
        index = (slice(start, start + rows),)
        keys[f"{name}.weight"] = OfficialSlice(f"{param}.weight", index)
        if bias:
            keys[f"{name}.bias"] = OfficialSlice(f"{param}.bias", index)
        start += rows
    return keys


def checkpoint_layout(model: nn.Module) -> Layout:
    """Official tensor name -> OfficialSlice for every weight of `model` (a quantized weight as the
    full-precision parameter it stands for)."""
    layout, claimed = {}, set()
    for module_name, module in model.named_modules():
        if hasattr(module, "checkpoint_keys"):
            prefix = f"{module_name}." if module_name else ""
            for official, where in module.checkpoint_keys().items():
                layout[prefix + official] = where._replace(param=prefix + where.param)
                claimed.add(prefix + where.param)
    for name in _weight_names(model):
        if name not in claimed:
            layout[name] = OfficialSlice(name)
    return layout


def stored_layout(model: nn.Module) -> Layout:
    """The names and slices of what a checkpoint of `model` holds: `checkpoint_layout`, with each
    quantized weight's entry split into its stored parts (for an unquantized model, the same map)."""
    holders = weight_holders(model)
    layout = {}
    for key, where in checkpoint_layout(model).items():
        holder = holders[where.param]
        if not isinstance(holder, QuantizedWeight):
            layout[key] = where
            continue
        for part in STORED:
            if getattr(holder, part) is None:
                continue
            shape = where.shape
            if shape is not None:  # the quantized (last) dim stays last: scale it to the stored width
                if where.permute[-1] != len(where.permute) - 1:
                    raise RuntimeError(f"internal error: {key} permutes the input columns of a quantized weight")
                shape = (*shape[:-1], shape[-1] * holder.stored_width(part) // holder.shape[-1])
            layout[f"{key}.{part}"] = where._replace(param=f"{where.param}.{part}", shape=shape)
    return layout


def weight_holders(model: nn.Module) -> dict:
    """Name -> every parameter, and every quantized weight (the module) by its own name."""
    holders = dict(model.named_parameters())
    holders.update((name, m) for name, m in model.named_modules() if isinstance(m, QuantizedWeight))
    return holders


def _weight_names(model: nn.Module):
    """Parameter names in model order, a quantized weight's parts replaced by its own name once."""
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    seen = set()
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in quantized:
            if owner not in seen:
                seen.add(owner)
                yield owner
        else:
            yield name


def official_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Official tensor name -> shape (works on a model on the meta device)."""
    holders = weight_holders(model)
    return {key: official_shape(holders, where) for key, where in checkpoint_layout(model).items()}


def official_shape(holders, where: OfficialSlice) -> Tuple[int, ...]:
    return tuple(where.shape) if where.shape is not None else tuple(_full(holders[where.param])[where.index].shape)


def to_official(params, where: OfficialSlice) -> torch.Tensor:
    view = params[where.param][where.index]
    return view.permute(where.permute).reshape(where.shape) if where.shape is not None else view


def copy_from_official(holders, where: OfficialSlice, tensor: torch.Tensor) -> None:
    """Write an official tensor into its slice (quantizing it when that is part of a quantized weight)."""
    holder = holders[where.param]
    target = _full(holder)[where.index]
    if where.shape is not None:
        dims = where.permute
        tensor = tensor.reshape([target.shape[d] for d in dims]).permute(sorted(range(len(dims)), key=dims.__getitem__))
    if isinstance(holder, QuantizedWeight):
        holder.write(where.index, tensor)
    else:
        target.copy_(tensor)


def _full(holder):
    """A parameter, or for a quantized weight a meta tensor of the full-precision shape (for slicing shapes)."""
    return torch.empty(holder.shape, device="meta") if isinstance(holder, QuantizedWeight) else holder
