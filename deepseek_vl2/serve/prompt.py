"""Checked chat messages plus their decoded images -> the engine's DeepSeek-VL2 conversation.

The `<image>` placement is the engine's one rule (`deepseek_vl2.engine.chat_conversation`): a user
message's images go where its text has `<image>` tags, images without a tag get one in front. Its
errors become 400s naming the message's content.

Control tokens typed as text are refused (`ControlTokens`): the prompt is tokenized as one string,
so a message containing `<|User|>`, `<|Assistant|>`, BOS, EOS, the pad token or any other special or
added token of the tokenizer would become that token and could forge turns. Only `<image>` (in user
messages) and the grounding tokens (`<|ref|>`, `<|/ref|>`, `<|det|>`, `<|/det|>`, `<|grounding|>`),
which users are meant to type, are allowed.
"""
import re
from typing import List

from PIL import Image

from ..engine import IMAGE_TAG, ImageTagError, chat_conversation
from ..processing.tokenizer_setup import GROUNDING_TOKENS
from .errors import APIError
from .schemas import Message

TYPEABLE_TOKENS = frozenset([IMAGE_TAG, *GROUNDING_TOKENS])


class ControlTokens:
    """The tokenizer's special and added tokens that message text must not contain."""

    def __init__(self, tokenizer):
        tokens = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        self.tokens = sorted(tokens - TYPEABLE_TOKENS, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self.tokens))) if self.tokens else None

    def check(self, messages: List[Message]) -> None:
        """A 400 naming the first message whose text holds a control token (and the token)."""
        if self._pattern is None:
            return
        for index, message in enumerate(messages):
            found = self._pattern.search(message.text)
            if found:
                raise APIError(400, f"messages[{index}]: the text contains {found.group()!r}, a control token of the "
                                    "model's tokenizer; remove it (role, sentence and padding tokens cannot be sent "
                                    "as text)", param=f"messages[{index}].content", code="control_token_in_text")


def build_conversation(messages: List[Message], images: List[Image.Image], control_tokens: ControlTokens) -> list:
    """`images` are the decoded images of all messages, in order."""
    control_tokens.check(messages)
    image_iter = iter(images)
    chat = [{"role": message.role, "content": message.text, "images": [next(image_iter) for _ in message.images]}
            for message in messages]
    try:
        return chat_conversation(chat)
    except ImageTagError as error:
        raise APIError(400, f"messages[{error.index}]: {error.detail}", param=f"messages[{error.index}].content",
                       code=None if error.misplaced else "image_tag_mismatch") from error
