"""deepseek_vl2: inference for the DeepSeek-VL2 vision-language models.

Importing the package registers the model with transformers' AutoConfig / AutoModelForCausalLM.
"""
from . import models  # noqa: F401  (registration)

__version__ = "1.1.0"
