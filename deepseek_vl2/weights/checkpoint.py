"""Strict loading and saving of checkpoints in the official on-disk format.

The official format is safetensors (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) with one tensor per official key (layout.py maps them onto the
parameters). Loading is nanoGPT-strict: every official key of the model must be present exactly
once with its shape, and nothing else may be in the files.

Tensors are read one at a time from memory-mapped files and copied straight into the parameters,
which are allocated once in the target dtype on the target device: no full-precision copy of the
model ever exists in host memory.
"""
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .hub import CheckpointError
from .layout import checkpoint_layout, copy_from_official, official_shape, stored_layout, to_official, weight_holders

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


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


def load_weights(model: nn.Module, checkpoint_dir: Path, progress: bool = True, stored_quantized: bool = False) -> None:
    """Fill every parameter of the (materialised) `model` from the checkpoint, strictly.

    The quantized weights of a quantized model are quantized tensor by tensor as they are read,
    on their own device, from a full-precision checkpoint; from a quantized checkpoint
    (`stored_quantized`) their stored parts are copied."""
    layout = stored_layout(model) if stored_quantized else checkpoint_layout(model)
    params = weight_holders(model)
    expected = {key: official_shape(params, where) for key, where in layout.items()}
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
                        copy_from_official(params, layout[key], shard.get_tensor(key))
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


SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_weights(model: nn.Module, save_dir: Path, max_shard_bytes: int = 5 * 1024**3,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write the model's parameters under their official names (sharded above `max_shard_bytes`; a
    quantized model's quantized weights as stored: layout.stored_layout), replacing any checkpoint
    already in `save_dir` (its weight files and index; nothing else).

    Files are written under temporary names first and renamed into place, the old index removed
    before that, so an interrupted save leaves the old checkpoint, the new one, or one that fails to
    load, never a silent mix of the two. Renaming also replaces a symlink (a hub cache snapshot)
    rather than writing through it into the cache's blob."""
    params = dict(model.named_parameters())
    shards, current, size = [], {}, 0
    for key, where in stored_layout(model).items():  # a quantized model's weights as stored
        tensor = to_official(params, where).detach()
        cast = dtype is not None and tensor.is_floating_point()
        tensor = (tensor.to(dtype) if cast else tensor).to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    save_dir.mkdir(parents=True, exist_ok=True)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                      for i in range(1, len(shards) + 1)]
    old_files = _checkpoint_files(save_dir)
    for name, shard in zip(names, shards):
        save_file(shard, str(save_dir / f".{name}.tmp"), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (save_dir / f".{INDEX_NAME}.tmp").write_text(json.dumps(index, indent=2, sort_keys=True))
    if (save_dir / INDEX_NAME).exists() or (save_dir / INDEX_NAME).is_symlink():
        (save_dir / INDEX_NAME).unlink()  # first: from here on the old shards are never read
    for name in names + ([INDEX_NAME] if len(shards) > 1 else []):  # the index last: the shards are in place
        os.replace(save_dir / f".{name}.tmp", save_dir / name)
    for stale in old_files - set(names) - {INDEX_NAME}:
        (save_dir / stale).unlink(missing_ok=True)


def _checkpoint_files(folder: Path) -> set:
    """Names of the weight files of a checkpoint in `folder`: model.safetensors, shards named the
    standard way, and whatever its index lists."""
    found = {p.name for p in folder.iterdir() if p.name == WEIGHTS_NAME or SHARD_NAME.fullmatch(p.name)}
    try:
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        found |= {name for name in weight_map.values()
                  if Path(name).name == name and name.endswith(".safetensors") and (folder / name).exists()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or one that names nothing usable
    return found
