"""The official import path of the VL model (lives in deepseek_vl2/modeling/vl_model.py)."""
from ..modeling.projector import MlpProjector
from ..modeling.vl_config import DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig
from ..modeling.vl_model import DeepseekVLV2ForCausalLM

__all__ = [
    "VisionEncoderConfig", "MlpProjectorConfig", "DeepseekVLV2Config", "MlpProjector", "DeepseekVLV2ForCausalLM",
]
