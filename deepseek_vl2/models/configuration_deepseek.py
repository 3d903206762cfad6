"""The official import path of the language config (lives in deepseek_vl2/modeling/language_config.py)."""
from ..modeling.language_config import DeepseekV2Config

__all__ = ["DeepseekV2Config"]
