"""Checkpoint names: the one map from each official tensor name to the part of this library's
parameters that holds it.

The official format has one tensor per official key, e.g.
`language.model.layers.3.mlp.experts.17.up_proj.weight`. Some of this library's parameters fuse or
stack several official tensors (q/k/v, gate/up, all experts of a layer); a module that does so says
how through `checkpoint_keys()`: official name suffix -> `OfficialSlice` (its parameter, the index
into it, and for an official tensor that is that slice permuted and reshaped, the permutation and
the official shape: the shared experts, stored as extra experts). `checkpoint_layout(model)`
collects that into one map for the whole model; every other parameter is its own official tensor.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn


class OfficialSlice(NamedTuple):
    """Where one official tensor lives: `param[index]`, permuted by `permute` and reshaped to `shape`
    when those are given."""

    param: str
    index: tuple = ()
    permute: Optional[Tuple[int, ...]] = None
    shape: Optional[Tuple[int, ...]] = None


Layout = Dict[str, OfficialSlice]  # official name -> where it lives


def checkpoint_layout(model: nn.Module) -> Layout:
    """Official tensor name -> OfficialSlice for every parameter of `model`."""
    layout, claimed = {}, set()
    for module_name, module in model.named_modules():
        if hasattr(module, "checkpoint_keys"):
            prefix = f"{module_name}." if module_name else ""
            for official, where in module.checkpoint_keys().items():
                layout[prefix + official] = where._replace(param=prefix + where.param)
                claimed.add(prefix + where.param)
    for name, _ in model.named_parameters():
        if name not in claimed:
            layout[name] = OfficialSlice(name)
    return layout


def official_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Official tensor name -> shape (works on a model on the meta device)."""
    params = dict(model.named_parameters())
    return {key: official_shape(params, where) for key, where in checkpoint_layout(model).items()}


def official_shape(params, where: OfficialSlice) -> Tuple[int, ...]:
    return tuple(where.shape) if where.shape is not None else tuple(params[where.param][where.index].shape)


def to_official(params, where: OfficialSlice) -> torch.Tensor:
    view = params[where.param][where.index]
    return view.permute(where.permute).reshape(where.shape) if where.shape is not None else view


def copy_from_official(params, where: OfficialSlice, tensor: torch.Tensor) -> None:
    target = params[where.param][where.index]
    if where.shape is not None:
        dims = where.permute
        tensor = tensor.reshape([target.shape[d] for d in dims]).permute(sorted(range(len(dims)), key=dims.__getitem__))
    target.copy_(tensor)
