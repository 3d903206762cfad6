"""The runtime side of a model spread over several devices (where each module goes is decided once,
in weights/placement.py; this file only follows the parameters).

A decoder whose embeddings, layers, final norm and LM head are not all on one device has a
`Split` (found from where the parameters are, again after every `.to()`): `run_layers` then runs
the layers in segments of consecutive layers on one device, moving the hidden states once at each
boundary and giving each device its own copy of the rope rows and the attention mask; the KV
cache keeps each layer's tensor on that layer's device; the logits come back to the device of the
input embeddings. A model on one device has no Split and runs exactly as before (one `is None`
check per forward). Modules placed on the CPU simply run there.

Triton launches on the *current* CUDA device, so every kernel launcher is wrapped in
`on_tensor_device`, and `generate` runs with the model's first device current (`on_model_device`),
which is what CUDA-graph capture on a model placed on cuda:1 needs.
"""
import copy
import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn


@dataclass
class Split:
    """Devices of a decoder spread over several devices."""

    layers: List[torch.device]  # one per decoder layer
    norm: torch.device
    head: torch.device
    segments: List[tuple]  # (device, first layer, end) runs of consecutive layers on one device


def module_device(module: nn.Module) -> Optional[torch.device]:
    """The device of a module's first parameter (None without parameters)."""
    param = next(module.parameters(), None)
    return None if param is None else param.device


def find_split(lm) -> Optional[Split]:
    """The Split of a DeepseekV2ForCausalLM, or None when it is all on one device."""
    decoder = lm.model
    layers = [module_device(layer) for layer in decoder.layers]
    norm, head, embed = module_device(decoder.norm), module_device(lm.lm_head), module_device(decoder.embed_tokens)
    if len({embed, norm, head, *layers}) <= 1:
        return None
    segments = []
    for i, device in enumerate(layers):
        if segments and segments[-1][0] == device:
            segments[-1] = (device, segments[-1][1], i + 1)
        else:
            segments.append((device, i, i + 1))
    return Split(layers=layers, norm=norm, head=head, segments=segments)


def hop(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device` (no copy when it is there already)."""
    return x if x.device == device else x.to(device)


def indexed(device) -> torch.device:
    """`device` as a torch.device, "cuda" made the current CUDA device with its index (as tensors
    placed there report it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def replicate(module: nn.Module, device) -> nn.Module:
    """A copy of `module` (on one device) with its parameters and buffers on `device`, made without a
    second copy on the module's own device: each tensor goes straight to `device`, and the rest of
    the module (its structure, its configs) is copied as usual."""
    device = indexed(device)
    copies = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        moved = tensor.detach().to(device, copy=True)
        copies[id(tensor)] = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
    twin = copy.deepcopy(module, memo=copies)
    left = {t.device for t in [*twin.parameters(), *twin.buffers()]} - {device}
    if left:
        raise ValueError(f"replicate: tensors of the copy stayed on {sorted(map(str, left))}")
    return twin


def current(device: torch.device):
    """A context in which `device` is the current CUDA device (a no-op for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NO_CONTEXT


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


def _call_on(device: torch.device, fn, *args, **kwargs):
    """fn(*args, **kwargs) with `device` current when it is a CUDA device other than the current
    one (no device switch, and no cost beyond one check, in the usual one-GPU case)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():  # CPU: Triton's interpreter
        return fn(*args, **kwargs)
    with torch.cuda.device(device):
        return fn(*args, **kwargs)


def on_tensor_device(launcher):
    """Wrap a Triton kernel launcher whose first argument is a CUDA tensor so that it launches on
    that tensor's device: Triton uses the current device and its stream, and a kernel on cuda:1
    memory launched while cuda:0 is current would run on the wrong GPU."""

    @functools.wraps(launcher)
    def launch(x, *args, **kwargs):
        return _call_on(x.device, launcher, x, *args, **kwargs)

    return launch


def on_model_device(method):
    """Run a model method (generate, incremental_prefilling) with the model's device current when
    it is a CUDA device other than the current one (a model loaded on cuda:1; the first device of
    a split model): the fast path's streams, graph pool and graph capture use the current device."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return _call_on(self.device, method, self, *args, **kwargs)

    return run


def partition_stream(device: torch.device, sms: int):
    """(a CUDA stream whose kernels run on `sms` streaming multiprocessors of `device` only, the green
    context that holds them): work on the stream leaves the GPU's other SMs free for kernels of
    other streams, which may also use these SMs while they are idle. Needs a torch with CUDA green
    contexts and a driver that has them (CUDA 12.8+); a ValueError that says so otherwise."""
    if device.type != "cuda":
        raise ValueError(f"SMs can be set aside on a CUDA GPU, not on {device}")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if not 0 < sms < total:
        raise ValueError(f"an SM partition of {device} holds 1 to {total - 1} of its {total} SMs, not {sms}")
    try:
        from torch.cuda.green_contexts import GreenContext

        context = GreenContext.create(num_sms=sms, device_id=device.index)
        stream = context.Stream()
    except (ImportError, AttributeError, RuntimeError) as error:
        raise ValueError(f"SMs of {device} cannot be set aside here (CUDA green contexts, torch {torch.__version__}): "
                         f"{error}") from error
    if not isinstance(stream, torch.cuda.Stream):  # a torch.Stream: the CUDA view of it (as current_stream makes)
        stream = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                                   device_type=stream.device_type)
    return stream, context
