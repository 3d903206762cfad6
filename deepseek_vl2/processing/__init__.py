"""Processing: chat text + PIL images -> model inputs, one module per concern under a thin `DeepseekVLV2Processor`."""
from .batching import BatchCollateOutput, DictOutput, VLChatProcessorOutput
from .image_tokens import ImageTokenInfo
from .processor import DeepseekVLV2Processor
from .tiling import ImageTransform, select_best_resolution

__all__ = ["BatchCollateOutput", "DictOutput", "VLChatProcessorOutput", "ImageTokenInfo", "DeepseekVLV2Processor",
           "ImageTransform", "select_best_resolution"]
