"""The official import path of the processor; the code lives in `deepseek_vl2.processing`."""
from ..processing.batching import BatchCollateOutput, DictOutput, VLChatProcessorOutput
from ..processing.chat_format import SYSTEM_ROLES
from ..processing.processor import DeepseekVLV2Processor
from ..processing.tiling import ImageTransform, select_best_resolution
from ..processing.tokenizer_setup import CHAT_ROLE_TOKENS, GROUNDING_TOKENS, PROCESSOR_CONFIG_NAME

__all__ = ["BatchCollateOutput", "DictOutput", "VLChatProcessorOutput", "DeepseekVLV2Processor", "ImageTransform",
           "select_best_resolution", "SYSTEM_ROLES", "CHAT_ROLE_TOKENS", "GROUNDING_TOKENS", "PROCESSOR_CONFIG_NAME"]
