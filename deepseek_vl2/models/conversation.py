"""The official import path of the chat templates; the code lives in `deepseek_vl2.processing.conversation`."""
from ..processing.conversation import (  # noqa: F401
    END_OF_SENTENCE,
    Conversation,
    SeparatorStyle,
    conv_templates,
    get_conv_template,
    register_conv_template,
)

__all__ = ["END_OF_SENTENCE", "Conversation", "SeparatorStyle", "conv_templates", "get_conv_template",
           "register_conv_template"]
