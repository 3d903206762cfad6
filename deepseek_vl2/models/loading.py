"""`from_pretrained`: build a model from its config on the meta device, allocate it once in the
target dtype on the target device(s), and fill it strictly from the checkpoint."""
import logging
from typing import Union

import torch
from torch import nn

from .checkpoint import load_weights, resolve_checkpoint_dir

logger = logging.getLogger(__name__)

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
IGNORED_KWARGS = (
    "trust_remote_code", "_from_auto", "adapter_kwargs", "low_cpu_mem_usage", "use_safetensors",
    "attn_implementation", "code_revision", "offload_folder", "offload_state_dict", "_fast_init",
    "resume_download", "use_auth_token", "output_loading_info", "max_memory",
)

DeviceMap = Union[None, str, int, torch.device, dict]


def resolve_dtype(requested, config) -> torch.dtype:
    """None or "auto" -> the checkpoint's dtype (config `torch_dtype`/`dtype`, else bfloat16)."""
    if requested is None or requested == "auto":
        requested = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.bfloat16
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


def resolve_device_map(device_map: DeviceMap, model: nn.Module, dtype: torch.dtype) -> Union[torch.device, dict]:
    """One torch.device, or a {module name: device} split for several GPUs.

    "auto": the first GPU if the model fits there, else a split over all GPUs (through accelerate),
    else the CPU."""
    if isinstance(device_map, dict):
        return {name: torch.device(_device_name(dev)) for name, dev in device_map.items()}
    if device_map != "auto":
        device = torch.device(_device_name(device_map if device_map is not None else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was requested but CUDA is not available here")
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    needed = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(0)
    if needed < 0.9 * free or torch.cuda.device_count() == 1:
        return torch.device("cuda", 0)
    from accelerate import infer_auto_device_map

    no_split = list({type(m).__name__ for m in model.modules() if type(m).__name__ in ("DecoderLayer", "Block")})
    return {k: torch.device(_device_name(v)) for k, v in
            infer_auto_device_map(model, no_split_module_classes=no_split, dtype=dtype).items()}


def _device_name(dev) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(dev)


def split_kwargs(kwargs: dict) -> dict:
    """Hub download options out of from_pretrained's kwargs; warn about ones this library ignores."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    for key in IGNORED_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        logger.warning("from_pretrained ignores these arguments: %s", sorted(kwargs))
    return hub


def from_pretrained(model_class, path, config=None, dtype=None, device_map: DeviceMap = None,
                    progress: bool = True, **kwargs):
    hub = split_kwargs(kwargs)
    checkpoint_dir = resolve_checkpoint_dir(path, **hub)
    if config is None:
        config = model_class.config_class.from_pretrained(str(checkpoint_dir))
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(dtype)
    placement = resolve_device_map(device_map, model, dtype)
    if isinstance(placement, dict):
        for device in set(placement.values()):
            check_dtype_for_device(dtype, device)
        _materialize_split(model, placement)
    else:
        check_dtype_for_device(dtype, placement)
        model.to_empty(device=placement)
    load_weights(model, checkpoint_dir, progress=progress)
    if isinstance(placement, dict):
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={k: str(v) for k, v in placement.items()})
    model.name_or_path = str(path)
    return model.eval()


def _materialize_split(model: nn.Module, placement: dict) -> None:
    """Allocate each parameter on the device of the longest device_map entry that contains it."""
    for name, param in list(model.named_parameters()):
        owners = [k for k in placement if k == "" or name == k or name.startswith(k + ".")]
        if not owners:
            raise ValueError(f"device_map does not place parameter {name}")
        device = placement[max(owners, key=len)]
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, attr, nn.Parameter(torch.empty_like(param, device=device)))
