"""Random weights for a model built without a checkpoint (benchmarks, offline demo checkpoints,
tests): norms at 1, everything else normal(0, std). Works in place on any device and dtype, so a
real-size model can be made directly on the GPU in bf16. A quantized weight is drawn in float32 one
expert (or one whole 2-D weight) at a time and quantized, so no full-precision copy of it exists."""
from typing import Optional

import torch
from torch import nn

from ..modeling.rms_norm import RMSNorm
from ..quantization.weight import QuantizedWeight


@torch.no_grad()
def init_random_weights(model: nn.Module, std: float = 0.02, seed: Optional[int] = 0) -> nn.Module:
    generator = None
    norms = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm)) for p in m.parameters()}
    quantized = {id(p) for m in model.modules() if isinstance(m, QuantizedWeight) for p in m.parameters()}
    for name, param in model.named_parameters():
        if id(param) in quantized:
            continue
        if generator is None or generator.device != param.device:
            generator = _generator(param.device, seed)
        if id(param) in norms:
            param.fill_(1.0) if name.endswith("weight") else param.zero_()
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            if generator is None or generator.device != module.device:
                generator = _generator(module.device, seed)
            for index in [(e,) for e in range(module.shape[0])] if len(module.shape) == 3 else [()]:
                rows = torch.empty(module.shape[len(index):], device=module.device)
                module.write(index, rows.normal_(0.0, std, generator=generator))
    return model


def _generator(device, seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    return generator
