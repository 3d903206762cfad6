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
import logging
import os
import re
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_PATTERNS = ["*.json", "*.model", "*.txt"]  # configs and tokenizer files
HUB_PATTERNS = PROCESSOR_PATTERNS + ["*.safetensors"]
HUB_PROBE_TIMEOUT_S = 4.0
OFFLINE_ADVICE = ("pass a local checkpoint directory instead, or run `python -m deepseek_vl2.offline_checkpoint "
                  "--out DIR` to make a random-weight test checkpoint")

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


def resolve_checkpoint_dir(path_or_repo_id, allow_patterns=HUB_PATTERNS, **hub_kwargs) -> Path:
    """A local checkpoint directory, or a hub repo id: downloaded (the files matching
    `allow_patterns`), or taken from the local hub cache when the hub is off or cannot be reached."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise CheckpointError(f"checkpoint directory {repo_id!r} does not exist (and is not a hub repo id)")
    from huggingface_hub import constants, snapshot_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only",
                                                             "force_download", "proxies") and v is not None}
    if allowed.get("local_files_only") or _hub_offline(constants):
        cached = _cached_snapshot(repo_id, allow_patterns, allowed)
        if cached is None:
            raise CheckpointError(f"{repo_id!r} is not a local directory, and it is not in the local Hugging Face "
                                  f"cache ({allowed.get('cache_dir') or constants.HF_HUB_CACHE}), which is all "
                                  f"that is used offline (HF_HUB_OFFLINE or local_files_only): {OFFLINE_ADVICE}")
        return cached
    # Without a network the hub client can wait on each connection and retry for a long time: ask
    # the endpoint once, briefly, and go to the local cache if it does not answer.
    if "proxies" not in allowed and not _hub_answers(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S):
        cached = _cached_snapshot(repo_id, allow_patterns, allowed)
        if cached is None:
            raise CheckpointError(f"{repo_id!r} is not a local directory, the Hugging Face hub ({constants.ENDPOINT}) "
                                  f"cannot be reached, and the local cache does not hold it: {OFFLINE_ADVICE}")
        logger.warning("the Hugging Face hub (%s) cannot be reached: using the cached %s", constants.ENDPOINT, cached)
        return cached
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, **allowed))
    except Exception as err:  # noqa: BLE001  (network, auth and not-found errors all end here)
        raise CheckpointError(f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub "
                              f"failed: {err} (to work without the hub: {OFFLINE_ADVICE})") from err


def _hub_offline(constants) -> bool:
    check = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.0; before, the constant
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def _cached_snapshot(repo_id: str, allow_patterns, allowed: dict) -> Optional[Path]:
    """The repo's snapshot in the local hub cache, if there is one with the files asked for."""
    from huggingface_hub import snapshot_download

    options = {k: v for k, v in allowed.items() if k in ("revision", "cache_dir")}
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True, **options))
    except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError) in every huggingface_hub version
        return None
    if "*.safetensors" in allow_patterns and not any(folder.glob("*.safetensors")):
        return None  # only the processor's files were fetched into it
    return folder


def _hub_answers(endpoint: str, timeout: float) -> bool:
    """Whether the hub endpoint answers at all (any HTTP status, even a TLS failure, counts) within
    `timeout` seconds. In a thread, as name resolution does not obey socket timeouts; through
    urllib, which uses the same proxy environment variables as the hub client."""
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError) as err:
            if not isinstance(getattr(err, "reason", err), ssl.SSLError):
                return  # refused, unresolvable, unroutable or timed out
        except Exception:  # noqa: BLE001  (an unexpected probe failure must not block a download)
            pass
        answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


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


SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_weights(model: nn.Module, save_dir: Path, max_shard_bytes: int = 5 * 1024**3,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write the model's parameters under their official names (sharded above `max_shard_bytes`),
    replacing any checkpoint already in `save_dir` (its weight files and index; nothing else).

    Files are written under temporary names first and renamed into place, the old index removed
    before that, so an interrupted save leaves the old checkpoint, the new one, or one that fails to
    load, never a silent mix of the two. Renaming also replaces a symlink (a hub cache snapshot)
    rather than writing through it into the cache's blob."""
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
