"""Strict loading and saving of checkpoints in the official on-disk format.

The official format is safetensors (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) with one tensor per official key, e.g.
`language.model.layers.3.mlp.experts.17.up_proj.weight`. Some of this library's parameters fuse or
stack several official tensors (q/k/v, gate/up, all experts of a layer); a module that does so
says how through `checkpoint_keys()`: official name suffix -> (its parameter, index into it), or
(parameter, index, dims, official shape) when the official tensor is that slice permuted by
`dims` and reshaped (the shared experts, stored as extra experts).
`checkpoint_layout(model)` collects that into one map for the whole model, and loading is then
nanoGPT-strict: every official key of the model must be present exactly once with its shape, and
nothing else may be in the files.

Tensors are read one at a time from memory-mapped files and copied straight into the parameters,
which are allocated once in the target dtype on the target device: no full-precision copy of the
model ever exists in host memory.
"""
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]

Layout = Dict[str, tuple]  # official name -> (parameter name, index[, dims, official shape])


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, unreadable shards, wrong tensors."""


def checkpoint_layout(model: nn.Module) -> Layout:
    """Official tensor name -> (parameter name, index) for every parameter of `model`."""
    layout, claimed = {}, set()
    for module_name, module in model.named_modules():
        if hasattr(module, "checkpoint_keys"):
            prefix = f"{module_name}." if module_name else ""
            for official, (param, *where) in module.checkpoint_keys().items():
                layout[prefix + official] = (prefix + param, *where)
                claimed.add(prefix + param)
    for name, _ in model.named_parameters():
        if name not in claimed:
            layout[name] = (name, ())
    return layout


def official_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Official tensor name -> shape (works on a model on the meta device)."""
    params = dict(model.named_parameters())
    return {key: _official_shape(params, entry) for key, entry in checkpoint_layout(model).items()}


def _official_shape(params, entry) -> Tuple[int, ...]:
    param, index, *reshape = entry
    return tuple(reshape[1]) if reshape else tuple(params[param][index].shape)


def _to_official(params, entry) -> torch.Tensor:
    param, index, *reshape = entry
    view = params[param][index]
    return view.permute(reshape[0]).reshape(reshape[1]) if reshape else view


def _copy_from_official(params, entry, tensor: torch.Tensor) -> None:
    param, index, *reshape = entry
    target = params[param][index]
    if reshape:
        dims = reshape[0]
        tensor = tensor.reshape([target.shape[d] for d in dims]).permute(sorted(range(len(dims)), key=dims.__getitem__))
    target.copy_(tensor)


def resolve_checkpoint_dir(path_or_repo_id, **hub_kwargs) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded (weights, configs, tokenizer)."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise CheckpointError(f"checkpoint directory {repo_id!r} does not exist (and is not a hub repo id)")
    from huggingface_hub import snapshot_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only",
                                                             "force_download", "proxies") and v is not None}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **allowed))
    except Exception as err:  # noqa: BLE001  (network, auth and not-found errors all end here)
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub failed: {err}"
        ) from err


def weight_files(checkpoint_dir: Path) -> list:
    index = checkpoint_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index.name} lists shards that are missing from {checkpoint_dir}: {absent}")
        return files
    single = checkpoint_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(p.name for p in checkpoint_dir.iterdir())
    hint = " (PyTorch .bin weights are not supported: convert them to safetensors)" if any(
        n.endswith(".bin") for n in found) else ""
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {checkpoint_dir}; it holds {found}{hint}")


def load_weights(model: nn.Module, checkpoint_dir: Path, progress: bool = True) -> None:
    """Fill every parameter of the (materialised) `model` from the checkpoint, strictly."""
    layout = checkpoint_layout(model)
    params = dict(model.named_parameters())
    expected = {key: _official_shape(params, entry) for key, entry in layout.items()}
    loaded, unexpected, misshaped = set(), [], []
    files = weight_files(checkpoint_dir)
    for file in _progress(files, progress and len(files) > 1):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    if key not in layout:
                        unexpected.append(key)
                        continue
                    shape = tuple(shard.get_slice(key).get_shape())
                    if shape != expected[key]:
                        misshaped.append(f"{key}: checkpoint {list(shape)}, model {list(expected[key])}")
                        continue
                    with torch.no_grad():
                        _copy_from_official(params, layout[key], shard.get_tensor(key))
                    loaded.add(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read checkpoint shard {file}: {err}") from err
    missing = sorted(set(layout) - loaded)
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_report(checkpoint_dir, missing, unexpected, misshaped))


def _mismatch_report(checkpoint_dir, missing, unexpected, misshaped, shown: int = 10) -> str:
    lines = [f"checkpoint {checkpoint_dir} does not match the model built from its config.json:"]
    for title, items in (("missing tensors", missing), ("unexpected tensors", sorted(unexpected)),
                         ("tensors with the wrong shape", misshaped)):
        if items:
            more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:shown])}{more}")
    return "\n".join(lines)


def _progress(files: Iterable, enabled: bool):
    if not enabled:
        return files
    from tqdm.auto import tqdm

    return tqdm(files, desc="Loading checkpoint shards", unit="shard")


def save_weights(model: nn.Module, save_dir: Path, max_shard_bytes: int = 5 * 1024**3,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write the model's parameters under their official names (sharded above `max_shard_bytes`)."""
    params = dict(model.named_parameters())
    shards, current, size = [], {}, 0
    for key, entry in checkpoint_layout(model).items():
        tensor = _to_official(params, entry).detach()
        tensor = (tensor.to(dtype) if dtype is not None else tensor).to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    save_dir.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(save_dir / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
