"""Weight-only quantization of the language model's linear layers (int8 per output channel, int4 per
group of input columns): the scheme (config.py), the round-to-nearest math (rtn.py), the quantized
weight container (weight.py), the quantized linear layer (linear.py) and the module swap (swap.py).
Loading, saving and the stored layout live with the other checkpoint code (weights/); the kernels
that read the quantized weights are chosen in kernels/dispatch.py."""
from .config import QuantizationConfig

__all__ = ["QuantizationConfig"]
