"""Chat formatting: conversations checked, rendered as display strings, and tokenized turn by turn.

The display string (`format_messages`, `format_prompts`, the sample's `sft_format`) is not what
gets tokenized: `tokenize_conversation` (the processor's `format_messages_v2`) renders each user
turn on its own, puts BOS once in front, encodes answers with no leading space followed by EOS, and
ignores the caller's system prompt (a first "system" message is encoded instead).

Reference assertions are ValueErrors with messages that name the problem (image tag count,
unknown role, misplaced system message, `<image>` in an answer). A conversation that is not a list
of {"role": str, "content": str} dicts is refused up front (TypeError, or ValueError for a missing
key), as is one without a user message.
"""

from __future__ import annotations

from collections.abc import Mapping

from .conversation import get_conv_template
from .image_tokens import uses_tiling
from .tokenization import ImageTextTokenizer

SYSTEM_ROLES = ("system", "deepseekapi-sys")


def chat_roles(sft_format: str):
    """(user roles, assistant roles) of the chat template, each with its plain alias."""
    user_role, assistant_role = get_conv_template(sft_format).roles
    return (user_role, "user"), (assistant_role, "assistant")


def check_conversations(conversations, sft_format: str, image_token: str) -> None:
    """Raise TypeError / ValueError, naming the message index, unless `conversations` is a
    non-empty list of {"role": str, "content": str} dicts with known roles and a user message."""
    if not isinstance(conversations, (list, tuple)):
        raise TypeError("`conversations` must be a list of {'role': ..., 'content': ...} dicts, got "
                        f"{type(conversations).__name__}")
    if len(conversations) == 0:
        raise ValueError("`conversations` is empty")
    user_roles, assistant_roles = chat_roles(sft_format)
    allowed = list(user_roles + assistant_roles + SYSTEM_ROLES)
    for index, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {index} of `conversations` is a {type(message).__name__}, expected a "
                            "dict with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {index} of `conversations` has no {key!r} key")
            if not isinstance(message[key], str):
                raise TypeError(f"message {index} of `conversations`: {key!r} must be a str, got "
                                f"{type(message[key]).__name__}" + (" (use '' for the turn to be generated)"
                                                                    if key == "content" else ""))
        if message["role"] not in allowed:
            raise ValueError(f"message {index} has unknown role {message['role']!r}; allowed roles: {allowed}")
        if message["role"] not in user_roles and image_token in message["content"]:
            raise ValueError(f"message {index} ({message['role']!r}) contains {image_token}; images may "
                             "only appear in user messages")
    if not any(message["role"] in user_roles for message in conversations):
        raise ValueError(f"the conversation has no user message (role {user_roles[0]!r} or 'user'); "
                         "there is nothing to answer")


def format_messages(conversations, sft_format="deepseek", system_prompt=""):
    """The display string of a whole conversation (roles used verbatim), stripped."""
    conv = get_conv_template(sft_format)
    conv.set_system_message(system_prompt)
    for message in conversations:
        conv.append_message(message["role"], message["content"].strip())
    return conv.get_prompt().strip()


def format_prompts(prompts, sft_format="deepseek", system_prompt=""):
    """The display string of one user turn followed by an empty assistant turn, stripped."""
    conv = get_conv_template(sft_format)
    conv.set_system_message(system_prompt)
    conv.append_message(conv.roles[0], prompts.strip())
    conv.append_message(conv.roles[1], "")
    return conv.get_prompt().strip()


def tokenize_conversation(messages, pil_images, tokens: ImageTextTokenizer, sft_format: str,
                          mask_prompt: bool, ignore_id: int):
    """Tokenize a conversation turn by turn.

    Returns `(ids, labels, tiles, images_seq_mask, spatial_crops, num_image_tokens)` as lists.
    """
    conv = get_conv_template(sft_format)
    template_system_message = conv.system_message
    user_role, assistant_role = conv.roles
    user_roles, assistant_roles = chat_roles(sft_format)
    cropping = uses_tiling(len(pil_images))
    tag = tokens.image_token

    total_tags = sum(str(m["content"]).count(tag) for m in messages if m["role"] in user_roles)
    if total_tags != len(pil_images):
        raise ValueError(
            f"the conversation has {total_tags} {tag} tags but {len(pil_images)} "
            f"images were given; pass one image per {tag} tag"
        )

    def prompt_labels(ids):
        return [ignore_id] * len(ids) if mask_prompt else ids

    ids, labels, seq_mask = [], [], []
    tiles, spatial_crops, num_image_tokens = [], [], []
    remaining_images = list(pil_images)
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0:
            ids.append(tokens.tokenizer.bos_token_id)
            labels.append(tokens.tokenizer.bos_token_id)
            seq_mask.append(False)

        if role in user_roles:
            conv.reset_message()
            conv.set_system_message(template_system_message if index == 0 else "")
            conv.append_message(user_role, str(content).strip())
            conv.append_message(assistant_role, "")
            text = conv.get_prompt()
            n_tags = text.count(tag)
            turn_images, remaining_images = remaining_images[:n_tags], remaining_images[n_tags:]
            turn_ids, turn_tiles, turn_mask, turn_crops, turn_counts = tokens.tokenize_with_images(
                text, turn_images, bos=False, eos=False, cropping=cropping)
            turn_labels = prompt_labels(turn_ids)
            tiles += turn_tiles
            spatial_crops += turn_crops
            num_image_tokens += turn_counts
        elif role in assistant_roles:
            answer = content.strip()
            if tag in answer:
                raise ValueError(
                    f"message {index} ({role!r}) contains {tag}; images may only "
                    "appear in user messages")
            turn_ids = tokens.encode(answer, bos=False, eos=True)
            turn_labels = turn_ids
            turn_mask = [False] * len(turn_ids)
        elif role in SYSTEM_ROLES:
            if index != 0:
                raise ValueError(
                    f"message {index} has role {role!r}; a system message is only allowed "
                    "as the first message")
            turn_ids = tokens.encode(content.strip(), bos=False, eos=False)
            turn_labels = prompt_labels(turn_ids)
            turn_mask = [False] * len(turn_ids)
        else:
            allowed = list(user_roles + assistant_roles + SYSTEM_ROLES)
            raise ValueError(f"message {index} has unknown role {role!r}; allowed roles: {allowed}")

        ids += turn_ids
        labels += turn_labels
        seq_mask += turn_mask

    assert len(ids) == len(seq_mask) == len(labels)
    assert len(spatial_crops) == len(num_image_tokens)
    return ids, labels, tiles, seq_mask, spatial_crops, num_image_tokens
