"""Public model API: `from deepseek_vl2.models import DeepseekVLV2Processor, DeepseekVLV2ForCausalLM`."""
from .configuration_deepseek import DeepseekV2Config
from .configuration_deepseek_vl_v2 import DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig
from .kv_cache import KVCache
from .modeling_deepseek import DeepseekV2ForCausalLM, DeepseekV2Model
from .modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM
from .processing_deepseek_vl_v2 import BatchCollateOutput, DeepseekVLV2Processor, VLChatProcessorOutput

__all__ = [
    "DeepseekV2Config", "DeepseekVLV2Config", "MlpProjectorConfig", "VisionEncoderConfig", "KVCache",
    "DeepseekV2ForCausalLM", "DeepseekV2Model", "DeepseekVLV2ForCausalLM",
    "BatchCollateOutput", "DeepseekVLV2Processor", "VLChatProcessorOutput",
]
