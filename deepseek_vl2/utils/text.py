"""Checks of text that came from outside (JSON, files)."""


def lone_surrogate(text: str) -> str:
    """The first lone UTF-16 surrogate in `text` as an escape ("\\ud800"), or "" when `text` is valid
    Unicode. JSON can escape one; no text encoding can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"\\u{ord(text[error.start]):04x}"
    return ""
