"""Random weights for a model built without a checkpoint (benchmarks, offline demo checkpoints,
tests): norms at 1, everything else normal(0, std). Works in place on any device and dtype, so a
real-size model can be made directly on the GPU in bf16."""
from typing import Optional

import torch
from torch import nn

from ..modeling.rms_norm import RMSNorm


@torch.no_grad()
def init_random_weights(model: nn.Module, std: float = 0.02, seed: Optional[int] = 0) -> nn.Module:
    generator = None
    norms = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm)) for p in m.parameters()}
    for name, param in model.named_parameters():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device)
            if seed is not None:
                generator.manual_seed(seed)
        if id(param) in norms:
            param.fill_(1.0) if name.endswith("weight") else param.zero_()
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    return model
