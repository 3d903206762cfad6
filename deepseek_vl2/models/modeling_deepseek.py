"""The official import path of the language model (lives in deepseek_vl2/modeling/decoder.py)."""
from ..modeling.decoder import DecoderLayer, DeepseekV2ForCausalLM, DeepseekV2Model, DeepseekV2RMSNorm
from ..modeling.language_config import DeepseekV2Config

__all__ = ["DeepseekV2Config", "DecoderLayer", "DeepseekV2Model", "DeepseekV2ForCausalLM", "DeepseekV2RMSNorm"]
