"""Chat templates for DeepSeek-VL2 prompts.

A `Conversation` holds a template (roles, separators, system text) plus the messages added so
far, and renders them with `get_prompt()`. Templates live in a module-level registry:
`register_conv_template` adds one, `get_conv_template(name)` returns a fresh copy of it.

Registered templates: "deepseek" (the one the released processors use), "deepseekv2",
"plain" and "alignment". Strings use the checkpoints' exact spelling: `<|User|>` has ASCII
bars, `<｜end▁of▁sentence｜>` has full-width bars (U+FF5C) and U+2581.
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto

END_OF_SENTENCE = "<｜end▁of▁sentence｜>"


class SeparatorStyle(Enum):
    DeepSeek = auto()
    DeepSeekV2 = auto()
    PLAIN = auto()
    ALIGNMENT = auto()


def _text_of(message):
    """A message is either text or a (text, images) tuple; PLAIN/ALIGNMENT render the text."""
    return message[0] if isinstance(message, tuple) else message


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    # Every registered template overrides this (odd-looking) default, kept from the reference.
    roles: tuple = (("USER", "ASSISTANT"),)
    messages: list = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.DeepSeek
    sep: str = "\n"
    sep2: str | None = None
    stop_str: list | None = None
    stop_token_ids: list | None = None  # stale DeepSeek-V2 ids; not used anywhere

    def get_prompt(self) -> str:
        """Render the system text and messages according to `sep_style` (not stripped)."""
        system = self.system_template.format(system_message=self.system_message)
        seps = [self.sep, self.sep2]
        style = self.sep_style

        if style == SeparatorStyle.DeepSeek:
            prompt = system + self.sep if system else ""
            for i, (role, message) in enumerate(self.messages):
                if message:
                    prompt += role + ": " + message + seps[i % 2]
                else:
                    prompt += role + ":"
            return prompt

        if style == SeparatorStyle.DeepSeekV2:
            prompt = system + self.sep if system else ""
            for role, message in self.messages:
                if not message:
                    continue
                # The registered roles are "|<User>|", so this branch never fires for them.
                if role == "User":
                    prompt += "<｜sft▁begin｜>\n" + message + self.sep
                else:
                    prompt += message + self.sep2
            return prompt

        if style == SeparatorStyle.PLAIN:
            prompt = ""
            for i, (_, message) in enumerate(self.messages):
                if message:
                    prompt += _text_of(message) + seps[i % 2]
            return prompt

        if style == SeparatorStyle.ALIGNMENT:
            prompt = ""
            for i, (_, message) in enumerate(self.messages):
                if not message:
                    continue
                if i % 2 == 0:
                    prompt += "<image>\n" + seps[0]
                else:
                    prompt += _text_of(message) + seps[1]
            return prompt

        raise ValueError(f"unsupported separator style: {style!r}")

    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def update_last_message(self, message) -> None:
        """Replace the text of the last message (used while streaming a reply)."""
        self.messages[-1][1] = message

    def reset_message(self) -> None:
        self.messages = []

    def to_gradio_chatbot(self) -> list:
        """[user, assistant] pairs from `offset` on."""
        pairs = []
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if i % 2 == 0:
                pairs.append([message, None])
            else:
                pairs[-1][-1] = message
        return pairs

    def to_openai_api_messages(self) -> list:
        """OpenAI chat format: the system entry, then alternating user/assistant entries."""
        result = [{"role": "system", "content": self.system_message}]
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if i % 2 == 0:
                result.append({"role": "user", "content": message})
            elif message is not None:
                result.append({"role": "assistant", "content": message})
        return result

    def copy(self) -> Conversation:
        """An independent copy: fresh [role, message] lists and fresh stop lists."""
        return dataclasses.replace(
            self,
            messages=[[role, message] for role, message in self.messages],
            stop_str=None if self.stop_str is None else list(self.stop_str),
            stop_token_ids=None if self.stop_token_ids is None else list(self.stop_token_ids),
        )

    def dict(self) -> dict:
        return {
            "template_name": self.name,
            "system_message": self.system_message,
            "roles": self.roles,
            "messages": self.messages,
            "offset": self.offset,
        }


conv_templates: dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if template.name in conv_templates and not override:
        raise ValueError(
            f"conversation template {template.name!r} is already registered; "
            "pass override=True to replace it"
        )
    conv_templates[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the registered template `name`."""
    if name not in conv_templates:
        raise KeyError(
            f"unknown conversation template {name!r}; known templates: {sorted(conv_templates)}"
        )
    return conv_templates[name].copy()


register_conv_template(
    Conversation(
        name="deepseek",
        system_template="{system_message}",
        system_message="",
        roles=("<|User|>", "<|Assistant|>"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.DeepSeek,
        sep="\n\n",
        sep2=END_OF_SENTENCE,
        stop_token_ids=[100001],
        stop_str=["User:", END_OF_SENTENCE],
    )
)

register_conv_template(
    Conversation(
        name="deepseekv2",
        system_template="{system_message}",
        system_message="",
        roles=("|<User>|", "|<Assistant>|"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.DeepSeekV2,
        sep="\n<｜sft▁end｜>",
        sep2=END_OF_SENTENCE,
        stop_token_ids=[100001],
        stop_str=["User:", END_OF_SENTENCE],
    )
)

register_conv_template(
    Conversation(
        name="plain",
        system_template="",
        system_message="",
        roles=("", ""),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.PLAIN,
        sep="",
        sep2="",
        stop_token_ids=[100001],
        stop_str=["</s>"],
    )
)

register_conv_template(
    Conversation(
        name="alignment",
        system_template="",
        system_message="",
        roles=("", ""),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.ALIGNMENT,
        sep="",
        sep2="",
        stop_token_ids=[100001],
        stop_str=["</s>"],
    )
)
