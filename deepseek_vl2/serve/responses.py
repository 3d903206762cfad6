"""OpenAI-format response bodies: a whole completion, stream chunks, usage, grounding boxes.

Grounding answers also carry their parsed boxes as `grounding` (in the message, or in the final
stream chunk's delta): `[{"label", "box" (0..999), "box_pixels", "image_index"}]`, relative to the
last image of the conversation, as the official demo draws them (pixels and index are null without
an image). OpenAI clients ignore the extra field.
"""
import json
import time
import uuid
from typing import List, Optional, Tuple

from ..engine import ChatResult
from ..grounding import boxes_to_json


class Completion:
    """The ids and names one answer's body or chunks share."""

    def __init__(self, model_id: str, image_sizes: List[Tuple[int, int]]):
        """`image_sizes`: (width, height) of the request's images, in order (the images themselves are
        not kept)."""
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id
        self.image_sizes = list(image_sizes)
        # a text chunk is this prefix, the piece as a JSON string, this suffix: chunk({"content": piece})
        # without building and encoding the envelope at every token
        marker = "\x00piece\x00"
        self._text_around = self.chunk({"content": marker}).split(json.dumps(marker, ensure_ascii=False))

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}

    def grounding(self, result: ChatResult) -> Optional[list]:
        if not result.boxes:
            return None
        if not self.image_sizes:
            return [{"label": b.label, "box": list(b.box), "box_pixels": None, "image_index": None}
                    for b in result.boxes]
        return [{**box, "image_index": len(self.image_sizes) - 1}
                for box in boxes_to_json(result.boxes, *self.image_sizes[-1])]

    def body(self, result: ChatResult) -> dict:
        message = {"role": "assistant", "content": result.text}
        grounding = self.grounding(result)
        if grounding is not None:
            message["grounding"] = grounding
        choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        return self._envelope("chat.completion", [choice], usage=usage(result))

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse(self._envelope("chat.completion.chunk", [choice]))

    def text_chunk(self, piece: str) -> str:
        """chunk({"content": piece}), the same text."""
        before, after = self._text_around
        return before + json.dumps(piece, ensure_ascii=False) + after

    def final_chunk(self, result: ChatResult) -> str:
        grounding = self.grounding(result)
        return self.chunk({"grounding": grounding} if grounding is not None else {}, result.finish_reason)

    def usage_chunk(self, result: ChatResult) -> str:
        return sse(self._envelope("chat.completion.chunk", [], usage=usage(result)))


def usage(result: ChatResult) -> dict:
    completion_tokens = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
