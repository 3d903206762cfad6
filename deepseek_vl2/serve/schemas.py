"""The body of `POST /v1/chat/completions`, checked field by field into a `ChatRequest`.

Accepted: `messages` (system/developer first, then user and assistant turns alternating, ending with
a user turn; content a string or a list of `text` and `image_url` parts, images in user turns only),
`model`, `stream`, `stream_options.include_usage`, `temperature` (0: greedy), `top_p`, `max_tokens` /
`max_completion_tokens`, `stop`, `seed`, and the extension `repetition_penalty`. Out-of-range values
are refused with the range (temperature 0..2, top_p above 0 up to 1, repetition_penalty 0.01..10,
seed within 64 bits, stop strings up to 256 characters), and so are message text longer than the
server's limit (before anything is tokenized), more than MAX_MESSAGES messages or MAX_CONTENT_PARTS
parts in one message, and strings that are not text (a lone UTF-16 surrogate, which a JSON escape
can hold). Parameters the model
cannot honour (`n` > 1, tools, logprobs, ...) are refused naming the parameter; other unknown fields
are ignored, as OpenAI clients send some that do not matter here (`user`, `metadata`, ...).
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from ..engine import GenerationParams
from ..engine.params import SEED_RANGE
from ..utils.text import lone_surrogate
from .errors import APIError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # one stop string
MAX_MESSAGES = 4096  # every message takes two tokens or more, and no model's context holds more than 4096
MAX_CONTENT_PARTS = 4096  # in one message's content list
# the sampling settings a request may ask for (inclusive); 0 < top_p, and temperature 0 means greedy
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
REPETITION_PENALTY_RANGE = (0.01, 10.0)

# parameter -> test of the values that ask for nothing this server cannot do
UNSUPPORTED = {
    "n": lambda v: v in (None, 1),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
}


@dataclass
class ImageRef:
    url: str
    param: str  # where it was in the request, for error messages


@dataclass
class Message:
    role: str  # "system", "user" or "assistant"
    text: str
    images: List[ImageRef] = field(default_factory=list)


@dataclass
class ChatRequest:
    messages: List[Message]
    params: GenerationParams
    model: Optional[str] = None
    stream: bool = False
    include_usage: bool = False
    max_tokens_param: Optional[str] = None  # "max_tokens" / "max_completion_tokens" when the request set it

    @property
    def images(self) -> List[ImageRef]:
        return [image for message in self.messages for image in message.images]


def parse_chat_request(body: Any, max_images: int, max_text_chars: int) -> ChatRequest:
    """`max_text_chars` bounds the text of each message, and of all messages together."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    for name, harmless in UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise APIError(400, f"'{name}' is not supported by this server (value {body[name]!r})", param=name,
                           code="unsupported_parameter")
    messages = _messages(body.get("messages"))
    _check_text_length(messages, max_text_chars)
    image_count = sum(len(message.images) for message in messages)
    if image_count > max_images:
        raise APIError(400, f"the request has {image_count} images; this server takes at most {max_images}",
                       param="messages", code="too_many_images")
    stream = _optional(body, "stream", bool, False)
    stream_options = _optional(body, "stream_options", dict, None)
    if stream_options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
    include_usage = (stream_options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    max_tokens_param = next((name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None),
                            None)
    model = _optional(body, "model", str, None)
    return ChatRequest(messages=messages, params=_generation_params(body), model=model and _text(model, "model"),
                       stream=stream, include_usage=include_usage, max_tokens_param=max_tokens_param)


def _text(value: str, param: str) -> str:
    """`value`, refused if it holds a lone UTF-16 surrogate."""
    surrogate = lone_surrogate(value)
    if surrogate:
        raise APIError(400, f"{param} is not valid text: it holds the lone UTF-16 surrogate {surrogate}", param=param,
                       code="invalid_text")
    return value


def _check_text_length(messages: List[Message], limit: int) -> None:
    for index, message in enumerate(messages):
        if len(message.text) > limit:
            raise APIError(400, f"messages[{index}]: the text is {len(message.text)} characters; this server takes "
                                f"at most {limit} per message", param=f"messages[{index}].content",
                           code="message_too_long")
    total = sum(len(message.text) for message in messages)
    if total > limit:
        raise APIError(400, f"the messages' text is {total} characters together; this server takes at most {limit}",
                       param="messages", code="message_too_long")


def _generation_params(body: dict) -> GenerationParams:
    defaults = GenerationParams()
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(body, max_tokens_name, int, defaults.max_new_tokens)
    temperature = _number(body, "temperature", defaults.temperature, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", defaults.top_p, *TOP_P_RANGE)
    repetition_penalty = _number(body, "repetition_penalty", defaults.repetition_penalty, *REPETITION_PENALTY_RANGE)
    if max_tokens < 1:
        raise APIError(400, f"'{max_tokens_name}' must be at least 1, got {max_tokens}", param=max_tokens_name)
    if top_p == 0:
        raise APIError(400, "'top_p' must be above 0", param="top_p")
    seed = _optional(body, "seed", int, None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise APIError(400, f"'seed' must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {seed}",
                       param="seed")
    return GenerationParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop=_stop(body.get("stop")))


def _messages(raw: Any) -> List[Message]:
    if raw is None:
        raise APIError(400, "'messages' is required", param="messages", code="missing_messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="empty_messages")
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"the request has {len(raw)} messages; this server takes at most {MAX_MESSAGES}",
                       param="messages", code="too_many_messages")
    messages = [_message(entry, f"messages[{index}]") for index, entry in enumerate(raw)]
    first_turn = 1 if messages[0].role == "system" else 0
    for index in range(first_turn, len(messages)):
        role = messages[index].role
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if role == "system":
            raise APIError(400, f"messages[{index}]: a system message is only allowed as the first message",
                           param=f"messages[{index}].role", code="invalid_role")
        if role != expected:
            raise APIError(400, f"messages[{index}] is a {role} message where a {expected} message belongs: "
                                "after an optional system message, user and assistant turns must alternate, "
                                "starting with user", param=f"messages[{index}].role", code="invalid_role")
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be a user message", param="messages", code="invalid_role")
    return messages


def _message(entry: Any, param: str) -> Message:
    if not isinstance(entry, dict):
        raise APIError(400, f"{param} must be an object with 'role' and 'content'", param=param)
    role = entry.get("role")
    if role not in ROLES:
        raise APIError(400, f"{param}.role is {role!r}; supported roles: {sorted(ROLES)}", param=f"{param}.role",
                       code="invalid_role")
    role = ROLES[role]
    content = entry.get("content")
    if isinstance(content, str):
        return Message(role, _text(content, f"{param}.content"))
    if not isinstance(content, list):
        raise APIError(400, f"{param}.content must be a string or a list of content parts", param=f"{param}.content")
    if len(content) > MAX_CONTENT_PARTS:
        raise APIError(400, f"{param}.content has {len(content)} parts; this server takes at most {MAX_CONTENT_PARTS}",
                       param=f"{param}.content", code="too_many_content_parts")
    texts, images = [], []
    for index, part in enumerate(content):
        part_param = f"{param}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(_text(part["text"], f"{part_param}.text"))
        elif kind == "image_url" and role == "user":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise APIError(400, f"{part_param}.image_url.url must be a string", param=f"{part_param}.image_url")
            images.append(ImageRef(_text(url, f"{part_param}.image_url"), f"{part_param}.image_url"))
        elif kind == "image_url":
            raise APIError(400, f"{part_param}: images are only allowed in user messages", param=part_param)
        else:
            raise APIError(400, f"{part_param} must be {{'type': 'text', 'text': ...}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}", param=part_param)
    return Message(role, "\n".join(texts), images)


def _stop(raw: Any) -> tuple:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters long", param="stop")
    return tuple(_text(s, "stop") for s in stops if s)


def _optional(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise APIError(400, f"'{name}' must be of type {kind.__name__}, got {value!r}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN too
        raise APIError(400, f"'{name}' must be a number from {low} to {high}, got {value!r}", param=name)
    return float(value)
