"""Loading: a checkpoint directory or hub id -> (processor, model), the model on one device in one dtype.

The one loading path: `ChatEngine.load` and `deepseek_vl2.utils.io.load_pretrained_model` both come
here. The weights are allocated directly in `dtype` on `device` (no float32 copy first; the
rotary-embedding buffers stay float32: docs/deviations.md#rope-tables-stay-float32-however-the-model-is-cast)
and the model is in eval mode.
"""
from typing import Optional

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def checked_device(name: Optional[str]) -> torch.device:
    """`name` (default: `default_device()`) as a torch.device; ValueError for a name torch does not know."""
    name = name or default_device()
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not understood: use 'cpu', 'cuda' or 'cuda:N'") from None


def default_dtype(device) -> torch.dtype:
    """bfloat16 on a GPU, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model_and_processor(model_path, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                             quantization=None):
    """`(processor, model)` of `model_path`; `device` defaults to CUDA when available, `dtype` to
    `default_dtype(device)`; `quantization` (None, "int8", "int4" or a QuantizationConfig) as
    from_pretrained takes it."""
    from ..models import DeepseekVLV2ForCausalLM
    from ..processing import DeepseekVLV2Processor

    device = str(checked_device(device))
    if dtype is None:
        dtype = default_dtype(device)
    processor = DeepseekVLV2Processor.from_pretrained(model_path)
    model = DeepseekVLV2ForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device, quantization=quantization)
    return processor, model
