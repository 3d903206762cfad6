"""`from_pretrained`: build a model from its config on the meta device, allocate it once in the
target dtype on the target device(s) (placement.py), and fill it strictly from the checkpoint.

With `quantization` (or a quantized checkpoint, whose config.json says so) the quantized weights are
swapped in on the meta device first, so only their quantized storage is ever allocated, and each
checkpoint tensor is quantized on its target device as it is read (checkpoint.load_weights)."""
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..generation import warmup
from ..modeling.language_config import ConfigError
from ..quantization.config import parse_quantization
from ..quantization.swap import quantize_modules
from .checkpoint import load_weights
from .hub import CheckpointError, resolve_checkpoint_dir
from .placement import PLANNED, DeviceMap, resolve_device_map

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
IGNORED_KWARGS = (
    "trust_remote_code", "_from_auto", "adapter_kwargs", "low_cpu_mem_usage", "use_safetensors",
    "attn_implementation", "code_revision", "offload_folder", "offload_state_dict", "_fast_init",
    "resume_download", "use_auth_token", "output_loading_info",
)


def dtype_field(config) -> str:
    """The config attribute that holds the checkpoint's dtype: `dtype` in transformers 5, where
    `torch_dtype` (the key of the official config.json) is read into `dtype` and the attribute is a
    deprecated alias that logs a warning when used; `torch_dtype` before."""
    return "dtype" if isinstance(getattr(type(config), "torch_dtype", None), property) else "torch_dtype"


def resolve_dtype(requested, config) -> torch.dtype:
    """None or "auto" -> the checkpoint's dtype (the config's, else bfloat16)."""
    if requested is None or requested == "auto":
        # before transformers 5 a config.json written by 5 ("dtype") arrives as a plain attribute
        names = ("dtype",) if dtype_field(config) == "dtype" else ("torch_dtype", "dtype")
        requested = next((value for value in (getattr(config, n, None) for n in names) if value), torch.bfloat16)
    if isinstance(requested, str):
        name = requested.replace("torch.", "")
        requested = getattr(torch, name, None)
        if not isinstance(requested, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    if requested not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {requested} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    return requested


def check_dtype_for_device(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse dtypes the device cannot run well, with the fix in the message."""
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on the CPU (several kernels are missing); "
                         "use torch.float32 or torch.bfloat16 there")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use torch.float16")


def split_kwargs(kwargs: dict) -> dict:
    """Hub download options out of from_pretrained's kwargs; warn about ones this library ignores."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    subfolder = kwargs.pop("subfolder", None)  # transformers' Auto classes pass "" (none)
    if subfolder:
        raise ValueError(f"subfolder={subfolder!r} is not supported: the DeepSeek-VL2 checkpoints keep their files "
                         "at the top of their repository (pass the directory that holds config.json)")
    for key in IGNORED_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        logger.warning("from_pretrained ignores these arguments: %s", sorted(kwargs))
    return hub


def from_pretrained(model_class, path, config=None, dtype=None, device_map: DeviceMap = None,
                    max_memory: Optional[dict] = None, progress: bool = True, warm_up: bool = True,
                    quantization=None, **kwargs):
    """`warm_up`: on a GPU, pay the first answer's one-time costs now (generation/warmup.py).
    `quantization`: None, "int8", "int4" or a QuantizationConfig (quantization/config.py)."""
    hub = split_kwargs(kwargs)
    checkpoint_dir = resolve_checkpoint_dir(path, **hub)
    if config is None:
        config = read_config(model_class.config_class, checkpoint_dir)
    dtype = resolve_dtype(dtype, config)
    scheme, stored_quantized = resolve_quantization(quantization, config, checkpoint_dir)
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(dtype)
    if scheme is not None:
        quantize_modules(model, scheme, dtype)
        config.quantization_config = scheme.to_dict()  # what save_pretrained records
    placement = resolve_device_map(device_map, model, dtype, max_memory)
    if isinstance(placement, dict):
        for device in set(placement.values()):
            check_dtype_for_device(dtype, device)
        _materialize_split(model, placement)
    else:
        check_dtype_for_device(dtype, placement)
        model.to_empty(device=placement)
    devices = set(placement.values()) if isinstance(placement, dict) else {placement}
    gpus = sorted((d for d in devices if d.type == "cuda"), key=str)
    background = warmup.start_background_work(gpus[0]) if warm_up and gpus else None
    load_weights(model, checkpoint_dir, progress=progress, stored_quantized=stored_quantized)
    if isinstance(device_map, dict) or device_map in PLANNED:
        units = placement if isinstance(placement, dict) else {"": placement}
        model.hf_device_map = {name: str(device) for name, device in units.items()}  # as transformers names it
    model.name_or_path = str(path)
    model.eval()
    if background is not None:
        background.join()
        warmup.warm_up(model)
    return model


def read_config(config_class, checkpoint_dir: Path):
    """The checkpoint's config.json, checked before a model is built from it: anything missing or of
    the wrong type is a CheckpointError that names the file and the key."""
    path = checkpoint_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {checkpoint_dir}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not text
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(values).__name__}")
    try:
        config_class.check_sections(values)
        config = config_class.from_pretrained(str(checkpoint_dir))
        config.validate_for_model()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return config


def resolve_quantization(requested, config, checkpoint_dir):
    """(the scheme to load with or None, whether the checkpoint is stored quantized): the requested
    one, or the one a quantized checkpoint's config.json records (asking for another is an error)."""
    requested = parse_quantization(requested)
    stored = parse_quantization(getattr(config, "quantization_config", None),
                                f"{checkpoint_dir}/config.json: quantization_config")
    if stored is not None and requested is not None and requested != stored:
        raise ValueError(f"{checkpoint_dir} holds a checkpoint quantized as {stored.describe()}; it cannot be "
                         f"loaded as {requested.describe()}: load it without `quantization`, or quantize the "
                         f"full-precision checkpoint")
    return stored or requested, stored is not None


def _materialize_split(model: nn.Module, placement: Dict[str, torch.device]) -> None:
    """Allocate each placement unit on its device, then let the models find their split."""
    for unit, device in placement.items():
        module_name, _, attr = unit.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        if attr in owner._parameters:
            setattr(owner, attr, nn.Parameter(torch.empty_like(owner._parameters[attr], device=device),
                                              requires_grad=owner._parameters[attr].requires_grad))
        else:
            model.get_submodule(unit).to_empty(device=device)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"internal error: parameters left on the meta device after placement: {left[:3]}")
    for module in model.modules():
        if hasattr(module, "refresh_placement"):
            module.refresh_placement()
