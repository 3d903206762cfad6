"""Checked chat messages plus their decoded images -> the engine's DeepSeek-VL2 conversation.

The `<image>` placement is the engine's one rule (`deepseek_vl2.engine.chat_conversation`): a user
message's images go where its text has `<image>` tags, images without a tag get one in front. Its
errors become 400s naming the message's content.
"""
from typing import List

from PIL import Image

from ..engine import ImageTagError, chat_conversation
from .errors import APIError
from .schemas import Message


def build_conversation(messages: List[Message], images: List[Image.Image]) -> list:
    """`images` are the decoded images of all messages, in order."""
    image_iter = iter(images)
    chat = [{"role": message.role, "content": message.text, "images": [next(image_iter) for _ in message.images]}
            for message in messages]
    try:
        return chat_conversation(chat)
    except ImageTagError as error:
        raise APIError(400, f"messages[{error.index}]: {error.detail}", param=f"messages[{error.index}].content",
                       code=None if error.misplaced else "image_tag_mismatch") from error
