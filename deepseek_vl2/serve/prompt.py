"""Checked chat messages plus their decoded images -> the engine's DeepSeek-VL2 conversation.

A user message's images go where its text has `<image>` tags; images without a tag get one in front
of the text ("<image>\\n" each, as the official demo does). More tags than images is an error. A
system message becomes the conversation's first ("system") message; an empty assistant turn closes
the conversation for the answer.
"""
from typing import List

from PIL import Image

from .errors import APIError
from .schemas import Message

IMAGE_TAG = "<image>"
ROLE_NAMES = {"system": "system", "user": "<|User|>", "assistant": "<|Assistant|>"}


def build_conversation(messages: List[Message], images: List[Image.Image]) -> list:
    """`images` are the decoded images of all messages, in order."""
    conversation = []
    image_iter = iter(images)
    for index, message in enumerate(messages):
        text = message.text
        tags = text.count(IMAGE_TAG)
        if message.role != "user" and tags:
            raise APIError(400, f"messages[{index}]: {IMAGE_TAG} tags are only allowed in user messages",
                           param=f"messages[{index}].content")
        if tags > len(message.images):
            raise APIError(400, f"messages[{index}] has {tags} {IMAGE_TAG} tags but {len(message.images)} images",
                           param=f"messages[{index}].content", code="image_tag_mismatch")
        text = (IMAGE_TAG + "\n") * (len(message.images) - tags) + text
        turn = {"role": ROLE_NAMES[message.role], "content": text}
        if message.role == "user":
            turn["images"] = [next(image_iter) for _ in message.images]
        conversation.append(turn)
    conversation.append({"role": ROLE_NAMES["assistant"], "content": ""})
    return conversation
