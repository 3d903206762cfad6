"""Engine: chat messages and images in, streamed answers out (ChatEngine, the continuous-batching ContinuousEngine,
settings, streaming, the `<image>` rule, loading)."""
from .chat_engine import BatchRow, ChatEngine, ChatResult, PromptTooLongError, Timings
from .continuous import ContinuousEngine
from .loading import load_model_and_processor
from .messages import IMAGE_TAG, ImageTagError, chat_conversation, tagged_text
from .params import GenerationParams, add_engine_arguments, sampling_key
from .prefill import PrefillSettings
from .streaming import BatchStream, RowsEnd, TextStream

__all__ = ["BatchRow", "ChatEngine", "ChatResult", "PromptTooLongError", "Timings", "ContinuousEngine", "PrefillSettings",
           "load_model_and_processor",
           "IMAGE_TAG", "ImageTagError", "chat_conversation", "tagged_text", "GenerationParams", "add_engine_arguments",
           "sampling_key", "BatchStream", "RowsEnd", "TextStream"]
