"""Device placement planning: where each part of a model goes for a `device_map` (decided here and
only here; modeling/devices.py follows the parameters at run time).

The model is cut into placement units that always stay whole (each decoder layer, the vision
tower, the projector, the embeddings, the final norm, the LM head, the two image-layout vectors) and
each unit gets one device, either from a user's dict or from accelerate's planning
(`infer_auto_device_map`, with `get_balanced_memory` for the balanced strategies) within
`max_memory`. No accelerate hooks are installed: the model code moves activations across device
boundaries itself (modeling/devices.py), and units placed on the CPU run on the CPU."""
import logging
from typing import Dict, List, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

DeviceMap = Union[None, str, int, torch.device, dict]

PLANNED = ("auto", "balanced", "balanced_low_0", "sequential")  # device_map strategies planned by accelerate
NO_SPLIT = ("DecoderLayer", "VisionTransformer", "MlpProjector")  # modules kept whole on one device
WITH_VISION = ("projector", "image_newline", "view_seperator")  # planned onto the vision tower's device


def resolve_device_map(device_map: DeviceMap, model: nn.Module, dtype: torch.dtype, max_memory: Optional[dict] = None,
                       gpu_count: Optional[int] = None) -> Union[torch.device, Dict[str, torch.device]]:
    """Where each part of `model` (built on the meta device) goes: one torch.device, or a
    {unit name: device} dict over the placement units (`placement_units`) when it spans devices.

    device_map:
      None / "cpu" / "cuda" / "cuda:N" / N / torch.device   everything on that device;
      "auto"            the first GPU if the model fits in its budget there (the CUDA-graph fast path
                        needs one device), else as "balanced";
      "balanced"        spread evenly over the GPUs (accelerate's get_balanced_memory), within max_memory;
      "balanced_low_0"  the same with as little as possible on GPU 0;
      "sequential"      fill GPU 0 up to its budget, then GPU 1, ...;
      {name: device}    modules or parameters by name ("" is the whole model; the longest name wins).
    The strategies plan through accelerate's infer_auto_device_map with `max_memory` ({0: "18GiB",
    1: "18GiB", "cpu": "64GiB"}; default: the free memory of every GPU and the CPU); what does not
    fit the GPUs goes to the CPU when max_memory allows it (and runs there). Disk offload is refused.
    `gpu_count` (default: the visible GPUs) lets the planning be checked without GPUs."""
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    planned = isinstance(device_map, str) and device_map in PLANNED
    if max_memory is not None and not planned:
        logger.warning("max_memory is only used with device_map in %s; ignored for device_map=%r", PLANNED, device_map)
    if isinstance(device_map, dict):
        placement = place_units(model, device_map, gpus)
    elif planned:
        placement = plan_placement(model, device_map, max_memory, dtype, gpus)
    else:
        return parse_device(device_map if device_map is not None else "cpu", gpus, "device_map")
    devices = set(placement.values())
    return devices.pop() if len(devices) == 1 else placement


def parse_device(value, gpus: int, what: str) -> torch.device:
    """A device_map value as a torch.device: "cpu", "cuda", "cuda:N", N or a torch.device; cuda
    devices must exist."""
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise ValueError(f"{what} = {value!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or a GPU index")
    if value == "disk":
        raise ValueError(f"{what} = 'disk': offloading weights to disk is not supported; place them on 'cpu' "
                         f"(they then run on the CPU) or on a GPU")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} = {value}: GPU indices start at 0")
        value = f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} = {value!r} is not understood: use {', '.join(repr(s) for s in PLANNED)}, "
                         f"'cpu', 'cuda', 'cuda:N', a GPU index or a {{module name: device}} dict") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{what} = {value!r}: only 'cpu' and CUDA devices are supported")
    if gpus == 0:
        raise ValueError(f"device {device} was requested ({what}) but CUDA is not available here")
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if index >= gpus:
        raise ValueError(f"{what} asks for cuda:{index}, but only {gpus} GPU(s) are visible "
                         f"(cuda:0 to cuda:{gpus - 1})")
    return torch.device("cuda", index)


def placement_units(model: nn.Module) -> Dict[str, List[str]]:
    """The parts that go to a device as a whole, in model order, with their parameter names: every
    module of a NO_SPLIT class (decoder layers, the vision tower, the projector), every other module
    with parameters and no submodules (embeddings, final norm, LM head), and parameters held
    directly by a container (image_newline, view_seperator)."""
    units: Dict[str, List[str]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, _ in module.named_parameters(recurse=False):
            units[prefix + name] = [prefix + name]
        for name, child in module.named_children():
            full = prefix + name
            if type(child).__name__ in NO_SPLIT or next(child.children(), None) is None:
                params = [f"{full}.{n}" for n, _ in child.named_parameters()]
                if params:
                    units[full] = params
            else:
                visit(full + ".", child)

    visit("", model)
    return units


def place_units(model: nn.Module, device_map: dict, gpus: int) -> Dict[str, torch.device]:
    """A {module or parameter name: device} map checked and turned into {unit: device}: every name
    must exist, every parameter must be placed, and no unit may be split over devices."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    entries = {}
    for key, value in device_map.items():
        if not isinstance(key, str) or (key != "" and key not in modules and key not in params):
            top = [name for name, _ in model.named_children()] + [name for name, _ in model.named_parameters(recurse=False)]
            raise ValueError(f"device_map names {key!r}, which is not a module or parameter of "
                             f"{type(model).__name__} (its top-level parts: {', '.join(top)}; \"\" is the whole model)")
        entries[key] = parse_device(value, gpus, f"device_map[{key!r}]")
    where, unplaced = {}, []
    for name in params:
        parts = name.split(".")
        for depth in range(len(parts), -1, -1):  # the longest entry containing the parameter
            key = ".".join(parts[:depth])
            if key in entries:
                where[name] = entries[key]
                break
        else:
            unplaced.append(name)
    if unplaced:
        raise ValueError(f"device_map leaves {len(unplaced)} parameter(s) unplaced, e.g. {unplaced[:3]}; add entries "
                         f"for them (a \"\" entry places everything not named)")
    placement = {}
    for unit, names in placement_units(model).items():
        devices = {where[name] for name in names}
        if len(devices) > 1:
            kind = type(model.get_submodule(unit)).__name__ if unit in modules else "parameter"
            raise ValueError(f"device_map splits {unit} ({kind}) over {', '.join(sorted(map(str, devices)))}; "
                             f"each decoder layer, the vision tower, the projector and each other leaf module "
                             f"must be whole on one device")
        placement[unit] = devices.pop()
    return placement


def memory_budgets(max_memory: dict, gpus: int) -> Dict[Union[int, str], int]:
    """max_memory checked and in accelerate's form: {GPU index: bytes, ..., "cpu": bytes}, GPUs first.
    Keys: GPU indices, "cuda:N" (or torch.device) and "cpu"; values: bytes or sizes like "18GiB"."""
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory must be a non-empty dict like {{0: '18GiB', 1: '18GiB'}}, not {max_memory!r}")
    budgets = {}
    for key, value in max_memory.items():
        if key == "disk":
            raise ValueError("max_memory['disk']: offloading weights to disk is not supported")
        if isinstance(key, bool) or not isinstance(key, (int, str, torch.device)):
            raise ValueError(f"max_memory key {key!r} is not a device: use GPU indices (0, 1, ...), 'cuda:N' or 'cpu'")
        try:
            device = parse_device(key, gpus, f"max_memory key {key!r}")
        except ValueError as err:
            raise ValueError(f"{err} (max_memory keys: GPU indices (0, 1, ...), 'cuda:N' or 'cpu')") from None
        name = "cpu" if device.type == "cpu" else device.index
        try:
            size = convert_file_size_to_int(int(value) if isinstance(value, float) else value)
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"max_memory[{key!r}] = {value!r} is not a size: use bytes or a string like '18GiB'") \
                from None
        if name in budgets:
            raise ValueError(f"max_memory gives {device} twice")
        budgets[name] = size
    gpu_keys = sorted(k for k in budgets if k != "cpu")
    return {**{k: budgets[k] for k in gpu_keys}, **({"cpu": budgets["cpu"]} if "cpu" in budgets else {})}


def plan_placement(model: nn.Module, strategy: str, max_memory: Optional[dict], dtype: torch.dtype,
                   gpus: int) -> Dict[str, torch.device]:
    """{unit: device} for a device_map strategy (see resolve_device_map), through accelerate."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory

    units = placement_units(model)
    budgets = memory_budgets(max_memory, gpus) if max_memory is not None else None
    if budgets is None and gpus == 0:
        return {unit: torch.device("cpu") for unit in units}
    size = compute_module_sizes(model, dtype=dtype)[""]
    if strategy == "auto":
        if budgets is None:
            first, room = 0, 0.9 * torch.cuda.mem_get_info(0)[0]
        else:
            first = next((k for k in budgets if k != "cpu" and budgets[k] > 0), None)
            room = budgets[first] if first is not None else 0
        if first is not None and size <= room:
            return {unit: torch.device("cuda", first) for unit in units}
        strategy = "balanced"
    if strategy.startswith("balanced"):
        budgets = get_balanced_memory(model, dict(budgets) if budgets is not None else None, list(NO_SPLIT), dtype,
                                      low_zero=strategy == "balanced_low_0")
    plan = infer_auto_device_map(model, dict(budgets) if budgets is not None else None, list(NO_SPLIT), dtype)
    on_disk = [name for name, device in plan.items() if device == "disk"]
    if on_disk:
        shown = {k: f"{v / 2**30:.1f}GiB" for k, v in (budgets or {}).items()}
        raise ValueError(f"the model ({size / 2**30:.1f} GiB in {dtype}) does not fit: with max_memory={max_memory} "
                         f"the {strategy!r} plan's per-device budgets are {shown or 'the free memory'} (accelerate "
                         f"also keeps room for the largest layer on the first GPU), and {len(on_disk)} part(s) "
                         f"({', '.join(on_disk[:3])}...) would be offloaded to disk, which is not supported; give "
                         f"the GPUs more memory or allow the CPU (max_memory['cpu'])")
    placement = place_units(model, {name: _device_name(device) for name, device in plan.items()}, gpus)
    vision = placement.get("vision")
    if vision is not None:  # the image path stays on one device (these are a few MB)
        for name in WITH_VISION:
            if name in placement:
                placement[name] = vision
    return placement


def describe_placement(model: nn.Module) -> Dict[str, dict]:
    """{device: {"modules": [unit names], "gib": parameter GiB}} from where the parameters are now."""
    params = dict(model.named_parameters())
    summary: Dict[str, dict] = {}
    for unit, names in placement_units(model).items():
        device = str(params[names[0]].device)
        entry = summary.setdefault(device, {"modules": [], "gib": 0.0})
        entry["modules"].append(unit)
        entry["gib"] += sum(params[n].numel() * params[n].element_size() for n in names) / 2**30
    return summary


def _device_name(dev) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(dev)
