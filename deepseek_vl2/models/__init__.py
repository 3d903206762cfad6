"""The official import paths: `from deepseek_vl2.models import DeepseekVLV2Processor, DeepseekVLV2ForCausalLM`."""
from ..modeling.decoder import DeepseekV2ForCausalLM, DeepseekV2Model
from ..modeling.kv_cache import KVCache
from ..modeling.language_config import DeepseekV2Config
from ..modeling.vl_config import DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig
from ..modeling.vl_model import DeepseekVLV2ForCausalLM
from .processing_deepseek_vl_v2 import BatchCollateOutput, DeepseekVLV2Processor, VLChatProcessorOutput

__all__ = [
    "DeepseekV2Config", "DeepseekVLV2Config", "MlpProjectorConfig", "VisionEncoderConfig", "KVCache",
    "DeepseekV2ForCausalLM", "DeepseekV2Model", "DeepseekVLV2ForCausalLM",
    "BatchCollateOutput", "DeepseekVLV2Processor", "VLChatProcessorOutput",
]
