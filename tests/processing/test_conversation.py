"""Conversation templates: rendering rules, the worked prompt strings of the official templates, registry."""

import pytest

from deepseek_vl2.models.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    get_conv_template,
    register_conv_template,
)

EOS = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def render(messages, template="deepseek", system=""):
    """Display string as the processor builds it: stripped get_prompt()."""
    conv = get_conv_template(template)
    conv.set_system_message(system)
    for role, message in messages:
        conv.append_message(role, message)
    return conv.get_prompt().strip()


@pytest.mark.parametrize(
    "messages, system, expected",
    [
        ([(USER, "<image>\nDescribe this image."), (ASSISTANT, "")], "",
         "<|User|>: <image>\nDescribe this image.\n\n<|Assistant|>:"),
        ([(USER, "<image>\nWhat animal is this?"), (ASSISTANT, "A cat."), (USER, "What color is it?"),
          (ASSISTANT, "")], "",
         "<|User|>: <image>\nWhat animal is this?\n\n<|Assistant|>: A cat." + EOS
         + "<|User|>: What color is it?\n\n<|Assistant|>:"),
        ([(USER, "<image>\nDescribe this image."), (ASSISTANT, "")], "You are a helpful assistant.",
         "You are a helpful assistant.\n\n<|User|>: <image>\nDescribe this image.\n\n<|Assistant|>:"),
        ([(USER, "<image>\n<|ref|>The giraffe at the back.<|/ref|>."), (ASSISTANT, "")], "",
         "<|User|>: <image>\n<|ref|>The giraffe at the back.<|/ref|>.\n\n<|Assistant|>:"),
        ([(USER, "<image>\n<|grounding|>I want to throw out the trash now, what should I do?"),
          (ASSISTANT, "")], "",
         "<|User|>: <image>\n<|grounding|>I want to throw out the trash now, what should I do?"
         "\n\n<|Assistant|>:"),
        ([(USER, "<image>\n<image>\n<|grounding|>In the first image, an object within the red rectangle "
                 "is marked. Locate the object of the same category in the second image."), (ASSISTANT, "")], "",
         "<|User|>: <image>\n<image>\n<|grounding|>In the first image, an object within the red rectangle "
         "is marked. Locate the object of the same category in the second image.\n\n<|Assistant|>:"),
    ],
    ids=["one-image", "history", "system", "ref-grounding", "grounded-chat", "two-images"],
)
def test_deepseek_worked_examples(messages, system, expected):
    assert render(messages, system=system) == expected


def test_deepseek_unstripped_and_separator_by_index_parity():
    conv = get_conv_template("deepseek")
    conv.append_message(USER, "a")
    conv.append_message(USER, "b")       # index 1 gets sep2 even though the role is the user's
    conv.append_message(ASSISTANT, "")   # empty: role + ":" with no space and no separator
    assert conv.get_prompt() == "<|User|>: a\n\n<|User|>: b" + EOS + "<|Assistant|>:"
    conv.reset_message()
    conv.append_message(USER, "x ")
    assert conv.get_prompt() == "<|User|>: x \n\n"


def test_deepseekv2_rendering():
    conv = get_conv_template("deepseekv2")
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], "Hello")
    conv.append_message(conv.roles[0], "")
    assert conv.get_prompt() == "Hi" + EOS + "Hello" + EOS   # the "User" branch never fires
    conv.set_system_message("SYS")
    assert conv.get_prompt() == "SYS\n<｜sft▁end｜>Hi" + EOS + "Hello" + EOS
    conv.reset_message()
    conv.set_system_message("")
    conv.append_message("User", "q")
    assert conv.get_prompt() == "<｜sft▁begin｜>\nq\n<｜sft▁end｜>"


def test_plain_rendering():
    conv = get_conv_template("plain")
    conv.append_message("", ("caption text", ["image"]))
    conv.append_message("", "answer")
    conv.append_message("", "")
    conv.set_system_message("ignored: plain has an empty system template")
    assert conv.get_prompt() == "caption textanswer"


def test_alignment_rendering():
    conv = get_conv_template("alignment")
    conv.append_message("", ("anything", ["image"]))
    conv.append_message("", ("a caption", ["image"]))
    conv.append_message("", "")
    conv.append_message("", "second caption")
    assert conv.get_prompt() == "<image>\na captionsecond caption"


def test_unknown_style_raises():
    conv = get_conv_template("deepseek")
    conv.sep_style = "bogus"
    with pytest.raises(ValueError, match="unsupported separator style"):
        conv.get_prompt()


def test_template_definitions():
    deepseek = get_conv_template("deepseek")
    assert deepseek.roles == ("<|User|>", "<|Assistant|>")
    assert (deepseek.sep, deepseek.sep2) == ("\n\n", EOS)
    assert deepseek.sep_style is SeparatorStyle.DeepSeek
    assert deepseek.stop_str == ["User:", EOS] and deepseek.stop_token_ids == [100001]
    assert (deepseek.system_template, deepseek.system_message) == ("{system_message}", "")
    v2 = get_conv_template("deepseekv2")
    assert v2.roles == ("|<User>|", "|<Assistant>|")
    assert (v2.sep, v2.sep2, v2.sep_style) == ("\n<｜sft▁end｜>", EOS, SeparatorStyle.DeepSeekV2)
    assert v2.stop_str == ["User:", EOS]
    for name, style in [("plain", SeparatorStyle.PLAIN), ("alignment", SeparatorStyle.ALIGNMENT)]:
        conv = get_conv_template(name)
        assert (conv.roles, conv.sep, conv.sep2, conv.sep_style) == (("", ""), "", "", style)
        assert (conv.system_template, conv.stop_str, conv.stop_token_ids) == ("", ["</s>"], [100001])
    assert [s.name for s in SeparatorStyle] == ["DeepSeek", "DeepSeekV2", "PLAIN", "ALIGNMENT"]
    assert [s.value for s in SeparatorStyle] == [1, 2, 3, 4]


def test_registry_returns_independent_copies():
    first = get_conv_template("deepseek")
    first.append_message(USER, "hello")
    first.set_system_message("changed")
    first.stop_str.append("extra")
    second = get_conv_template("deepseek")
    assert second.messages == [] and second.system_message == ""
    assert second.stop_str == ["User:", EOS]
    assert first is not second and first.messages is not second.messages


def test_copy_makes_fresh_message_lists():
    conv = get_conv_template("deepseek")
    conv.append_message(USER, "a")
    clone = conv.copy()
    clone.update_last_message("b")
    assert conv.messages == [[USER, "a"]] and clone.messages == [[USER, "b"]]


def test_register_and_override():
    template = Conversation(name="test-template", roles=("Q", "A"), sep=" ", sep2="|")
    register_conv_template(template)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_conv_template(Conversation(name="test-template"))
        register_conv_template(Conversation(name="test-template", roles=("X", "Y")), override=True)
        assert get_conv_template("test-template").roles == ("X", "Y")
    finally:
        del conv_templates["test-template"]


def test_unknown_template_lists_names():
    with pytest.raises(KeyError, match=r"unknown conversation template 'nope'.*'alignment', 'deepseek'"):
        get_conv_template("nope")


def test_message_helpers():
    conv = get_conv_template("deepseek")
    conv.set_system_message("sys")
    conv.append_message(USER, "q1")
    conv.append_message(ASSISTANT, "a1")
    conv.append_message(USER, "q2")
    conv.append_message(ASSISTANT, None)
    assert conv.to_gradio_chatbot() == [["q1", "a1"], ["q2", None]]
    assert conv.to_openai_api_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    conv.update_last_message("a2")
    assert conv.messages[-1] == [ASSISTANT, "a2"]
    assert conv.dict() == {
        "template_name": "deepseek",
        "system_message": "sys",
        "roles": (USER, ASSISTANT),
        "messages": [[USER, "q1"], [ASSISTANT, "a1"], [USER, "q2"], [ASSISTANT, "a2"]],
        "offset": 0,
    }
    conv.offset = 2
    assert conv.to_gradio_chatbot() == [["q2", "a2"]]
    conv.reset_message()
    assert conv.messages == []
