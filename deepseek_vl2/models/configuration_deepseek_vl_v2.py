"""The official import path of the VL configs (live in deepseek_vl2/modeling/vl_config.py)."""
from ..modeling.vl_config import DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig

__all__ = ["VisionEncoderConfig", "MlpProjectorConfig", "DeepseekVLV2Config"]
