"""Chat messages with images -> the engine's conversation: the one rule for where `<image>` tags go.

A user message's images go where its text has `<image>` tags, in order; images without a tag get
one each in front of the text ("<image>\\n" per image, as the official web demo does). More tags
than images, and tags or images in a system or assistant message, are errors (`ImageTagError`, a
ValueError naming the message). The conversation ends with an empty assistant turn, the one the
model answers. inference.py, web_demo.py and the server (serve/prompt.py) all build their
conversations here.
"""
from typing import List, Mapping, Sequence

IMAGE_TAG = "<image>"
ROLE_NAMES = {"system": "system", "user": "<|User|>", "assistant": "<|Assistant|>"}
USER, ASSISTANT = ROLE_NAMES["user"], ROLE_NAMES["assistant"]


class ImageTagError(ValueError):
    """Tags and images of message `index` do not fit the rule; `misplaced`: they are in a non-user message."""

    def __init__(self, index: int, detail: str, misplaced: bool = False):
        super().__init__(f"message {index}: {detail}")
        self.index = index
        self.detail = detail
        self.misplaced = misplaced


def tagged_text(text: str, image_count: int, index: int = 0) -> str:
    """`text` with one `<image>` tag per image: the missing ones go in front, "<image>\\n" each."""
    tags = text.count(IMAGE_TAG)
    if tags > image_count:
        raise ImageTagError(index, f"{tags} {IMAGE_TAG} tags but {image_count} images; each tag needs an image "
                                   "(images without a tag get one in front of the text)")
    return (IMAGE_TAG + "\n") * (image_count - tags) + text


def chat_conversation(messages: Sequence[Mapping]) -> List[dict]:
    """The engine's conversation for chat `messages`, closed by an empty assistant turn.

    Each message is a dict with "role" ("system", "user", "assistant", or the template's "<|User|>" /
    "<|Assistant|>"), "content" (str) and, for user messages, optional "images" (file paths or PIL
    images, in tag order; they are kept in the turn for `load_pil_images`)."""
    conversation = []
    for index, message in enumerate(messages):
        role = ROLE_NAMES.get(message["role"], message["role"])
        text, images = message["content"], list(message.get("images") or [])
        if role != USER:
            if images or IMAGE_TAG in text:
                raise ImageTagError(index, f"{IMAGE_TAG} tags and images are only allowed in user messages",
                                    misplaced=True)
            conversation.append({"role": role, "content": text})
            continue
        conversation.append({"role": role, "content": tagged_text(text, len(images), index), "images": images})
    conversation.append({"role": ASSISTANT, "content": ""})
    return conversation
