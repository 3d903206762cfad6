"""Strict loading and saving of checkpoints in the official on-disk format.

The official format is safetensors (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) with one tensor per official key (layout.py maps them onto the
parameters). Loading is nanoGPT-strict: every official key of the model must be present exactly
once with its shape and a dtype that fits (an integer part of a quantized weight exactly its own, a
floating weight any floating dtype: it is cast), and nothing else may be in the files.

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
        weight_map = read_weight_map(index)
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


def read_weight_map(index: Path) -> dict:
    """The index's weight_map (tensor name -> shard file name in the checkpoint directory), checked."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not text
        raise _invalid_index(index, str(err)) from err
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise _invalid_index(index, "it must be a JSON object whose weight_map is an object")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise _invalid_index(index, f"weight_map[{key!r}] is {name!r}, not a shard file name")
        if name in ("", "..") or Path(name).name != name:
            raise _invalid_index(index, f"weight_map[{key!r}] is {name!r}, not a file name in {index.parent}")
    return weight_map


def _invalid_index(index: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{index} is not a valid safetensors index: {problem}")


def load_weights(model: nn.Module, checkpoint_dir: Path, progress: bool = True, stored_quantized: bool = False) -> None:
    """Fill every parameter of the (materialised) `model` from the checkpoint, strictly.

    The quantized weights of a quantized model are quantized tensor by tensor as they are read,
    on their own device, from a full-precision checkpoint; from a quantized checkpoint
    (`stored_quantized`) their stored parts are copied."""
    loader = _StrictLoader(model, stored_quantized)
    files = weight_files(checkpoint_dir)
    for file in _progress(files, progress and len(files) > 1):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    loader.take(shard, key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read checkpoint shard {file}: {err}") from err
    loader.check_complete(checkpoint_dir)


MISSING, UNEXPECTED, DUPLICATED = "missing tensors", "unexpected tensors", "duplicated tensors"
MISSHAPED, WRONG_DTYPE = "tensors with the wrong shape", "tensors with the wrong dtype"


class _StrictLoader:
    """Copies a checkpoint's tensors into the model's parameters one by one, noting each one that has
    no place there or does not fit it; `check_complete` reports them all, and the ones never seen."""

    def __init__(self, model: nn.Module, stored_quantized: bool):
        self.layout = stored_layout(model) if stored_quantized else checkpoint_layout(model)
        self.holders = weight_holders(model)
        self.seen = set()
        self.problems = {title: [] for title in (MISSING, UNEXPECTED, DUPLICATED, MISSHAPED, WRONG_DTYPE)}

    def take(self, shard, key: str) -> None:
        if key in self.seen:
            self.problems[DUPLICATED].append(key)
            return
        self.seen.add(key)
        where = self.layout.get(key)
        if where is None:
            self.problems[UNEXPECTED].append(key)
            return
        shape, expected_shape = tuple(shard.get_slice(key).get_shape()), official_shape(self.holders, where)
        if shape != expected_shape:
            self.problems[MISSHAPED].append(f"{key}: checkpoint {list(shape)}, model {list(expected_shape)}")
            return
        tensor = shard.get_tensor(key)
        # a quantized weight's dtype is its activation dtype: a full-precision tensor is quantized into it
        expected_dtype = self.holders[where.param].dtype
        if not _dtype_fits(tensor.dtype, expected_dtype):
            expected = "a floating dtype" if expected_dtype.is_floating_point else _dtype_name(expected_dtype)
            self.problems[WRONG_DTYPE].append(f"{key}: checkpoint {_dtype_name(tensor.dtype)}, expected {expected}")
            return
        with torch.no_grad():
            copy_from_official(self.holders, where, tensor)

    def check_complete(self, checkpoint_dir: Path) -> None:
        self.problems[MISSING] = sorted(set(self.layout) - self.seen)
        if any(self.problems.values()):
            raise CheckpointError(_mismatch_report(checkpoint_dir, self.problems))


def _dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a stored tensor can fill a parameter: a floating one from any floating dtype (it is
    cast: the releases are bfloat16), an integer one (a quantized weight's part) only from its own."""
    return stored == expected or (stored.is_floating_point and expected.is_floating_point)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mismatch_report(checkpoint_dir, problems: dict, shown: int = 10) -> str:
    lines = [f"checkpoint {checkpoint_dir} does not match the model built from its config.json:"]
    for title, items in problems.items():
        items = sorted(items) if title in (UNEXPECTED, DUPLICATED) else items
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
