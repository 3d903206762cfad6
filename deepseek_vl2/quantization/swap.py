"""The module swap: which weights of a model are quantized, done on a model built on the meta device
(before its weights are allocated and loaded).

Quantized: every linear layer inside the decoder layers (attention projections, the dense MLP) and the
stacked experts (routed and shared); the LM head too (to int8) where the config asks for it. Kept in
the activation dtype: embeddings, norms, the MoE router, the vision tower and projector, and MLA's
kv_b_proj, whose weight the absorbed attention reads as two per-head matrices rather than running it
as a linear layer (0.4% of small's weights).
"""
import torch
from torch import nn

from ..modeling.decoder import DecoderLayer, DeepseekV2ForCausalLM
from ..modeling.moe import RoutedExperts
from .config import QuantizationConfig
from .linear import QuantizedLinear
from .weight import QuantizedWeight

KEPT_LINEARS = ("kv_b_proj",)  # linear layers of a decoder layer that are not quantized (see above)
EXPERT_STACKS = ("gate_up_proj", "down_proj")
LM_HEAD_SCHEME = "int8"  # a quantized LM head's scheme, whatever the decoder layers' (config.py says why)


def quantize_modules(model: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> nn.Module:
    """Replace the quantized weights of every decoder layer of `model` (in place) by quantized
    stand-ins in `dtype`, on the device of the weights they replace (normally meta). Returns `model`."""
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers to quantize")
    for layer in layers:
        for name, module in list(layer.named_modules()):
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            if isinstance(module, nn.Linear) and attr not in KEPT_LINEARS:
                quantized = QuantizedLinear(module.in_features, module.out_features, module.bias is not None,
                                            config, dtype, module.weight.device)
                setattr(owner, attr, quantized)
            elif isinstance(module, RoutedExperts):
                for stack in EXPERT_STACKS:
                    full = module._parameters.pop(stack)
                    module.add_module(stack, QuantizedWeight(tuple(full.shape), config, dtype, full.device))
    if config.lm_head:
        for lm in [m for m in model.modules() if isinstance(m, DeepseekV2ForCausalLM)]:
            head = lm.lm_head
            lm.lm_head = QuantizedLinear(head.in_features, head.out_features, False,
                                         QuantizationConfig(LM_HEAD_SCHEME), dtype, head.weight.device)
    return model

