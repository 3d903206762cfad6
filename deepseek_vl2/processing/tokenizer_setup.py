"""Tokenizer set-up: special tokens the processor adds, and the processor's files (local or hub).

`add_processor_tokens` changes a tokenizer in the reference's order (ids depend on it). The
special-token ids found or added are reported through `logging`, not printed
(docs/deviations.md#token-ids-go-to-logging).
`from_pretrained` reads `processor_config.json` and the tokenizer files of a directory or a hub id;
unreadable files are reported with their path, and a value of the wrong type or range with the file
(or the from_pretrained argument), its key, the value and what is expected (`check_processor_values`).
The tokenizer is loaded with `PreTrainedTokenizerFast`: under transformers 5.x the `LlamaTokenizerFast`
class named in the checkpoints re-tokenizes their byte-level `tokenizer.json` wrongly and loses spaces and newlines.
"""

from __future__ import annotations

import json
import logging
import math
import os
from numbers import Real

from tokenizers import AddedToken

from .conversation import conv_templates

# the processor module's logger name, which users may already filter on
logger = logging.getLogger("deepseek_vl2.models.processing_deepseek_vl_v2")

GROUNDING_TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
CHAT_ROLE_TOKENS = ["<|User|>", "<|Assistant|>"]
PROCESSOR_CONFIG_NAME = "processor_config.json"
REQUIRED_KEYS = ("candidate_resolutions", "patch_size", "downsample_ratio")


def add_processor_tokens(tokenizer, pad_token: str, image_token: str) -> int:
    """Left padding, the pad token if missing, the image token, grounding and role tokens; returns
    the image token's id."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": _special(pad_token)})
    logger.info("pad token %r has id %s", tokenizer.pad_token, tokenizer.pad_token_id)

    image_token_id = tokenizer.get_vocab().get(image_token)
    if image_token_id is None:
        tokenizer.add_special_tokens({"additional_special_tokens": [_special(image_token)]})
        image_token_id = tokenizer.get_vocab()[image_token]
    logger.info("image token %r has id %s", image_token, image_token_id)

    # Each call replaces the tokenizer's additional-special-token list (as the reference
    # does); every token stays in the vocabulary as a special added token.
    for group in (GROUNDING_TOKENS, CHAT_ROLE_TOKENS):
        tokenizer.add_special_tokens({"additional_special_tokens": [_special(t) for t in group]})
        logger.info("special tokens %s", {t: tokenizer.convert_tokens_to_ids(t) for t in group})
    return image_token_id


def _special(token: str) -> AddedToken:
    """A special token that matches only its exact text and never absorbs whitespace."""
    return AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)


def processor_directory(path_or_hub_id) -> str:
    """A local directory as it is; a hub id fetched as the model's files are (the local cache when offline)."""
    if not isinstance(path_or_hub_id, (str, os.PathLike)):
        raise TypeError("from_pretrained needs a directory path or a hub id (str), got "
                        f"{type(path_or_hub_id).__name__}")
    path_or_hub_id = os.fspath(path_or_hub_id)
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    from ..models.checkpoint import PROCESSOR_PATTERNS, resolve_checkpoint_dir

    return str(resolve_checkpoint_dir(path_or_hub_id, allow_patterns=PROCESSOR_PATTERNS))


def read_processor_config(directory: str, accepted, overrides: dict) -> dict:
    """Constructor arguments from `processor_config.json` (keys in `accepted`), `overrides` on top."""
    config_path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as error:
            raise ValueError(f"cannot parse the processor config {config_path}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, not a {type(config).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in config and key not in overrides]
    if missing:
        raise ValueError(f"{config_path} lacks the required keys {missing}")
    ignored = sorted(set(config) - set(accepted) - {"processor_class"})
    if ignored:
        logger.warning("ignoring unknown keys in %s: %s", PROCESSOR_CONFIG_NAME, ignored)
    kwargs = {key: value for key, value in config.items() if key in accepted}
    kwargs.update(overrides)
    check_processor_values(kwargs, config_path, overrides)
    return kwargs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _is_positive_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_resolution_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_positive_int, pair)) for pair in value)


def _is_channel_triple(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) for x in value)


def _is_text(value) -> bool:
    return isinstance(value, str) and value != ""


# processor_config.json key -> (whether a value is usable, what is expected)
VALUE_CHECKS = {
    "candidate_resolutions": (_is_resolution_list, "a non-empty list of (width, height) pairs of positive integers"),
    "patch_size": (_is_positive_int, "a positive integer"),
    "downsample_ratio": (_is_positive_number, "a positive number"),
    "image_mean": (_is_channel_triple, "a list of 3 numbers (one per RGB channel)"),
    "image_std": (lambda value: _is_channel_triple(value) and all(x > 0 for x in value),
                  "a list of 3 positive numbers (one per RGB channel)"),
    "normalize": (lambda value: isinstance(value, bool), "true or false"),
    "add_special_token": (lambda value: isinstance(value, bool), "true or false"),
    "mask_prompt": (lambda value: isinstance(value, bool), "true or false"),
    "image_token": (_is_text, "a non-empty string"),
    "pad_token": (_is_text, "a non-empty string"),
    "sft_format": (lambda value: isinstance(value, str) and value in conv_templates,
                   "the name of a conversation template"),
    "ignore_id": (_is_int, "an integer"),
}


def check_processor_values(kwargs: dict, config_path: str, overrides: dict) -> None:
    """ValueError naming where a value came from (the file or the from_pretrained argument), its key,
    the value and what is expected, for the first unusable one."""
    for key, value in kwargs.items():
        if key not in VALUE_CHECKS or VALUE_CHECKS[key][0](value):
            continue
        expected = VALUE_CHECKS[key][1]
        if key == "sft_format":
            expected += f" ({', '.join(sorted(conv_templates))})"
        source = f"from_pretrained argument {key}" if key in overrides else f"{config_path}: {key}"
        raise ValueError(f"{source} must be {expected}, got {value!r}")


def write_processor_config(directory: str, config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def load_tokenizer(directory: str):
    """The fast tokenizer of `directory`; a missing or unparsable file is named in the error."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as error:  # the tokenizers library raises a bare Exception on bad JSON
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"cannot load the tokenizer: {tokenizer_file} does not exist") from error
        raise ValueError(f"cannot load the tokenizer from {directory!r}: "
                         f"{_tokenizer_files_problem(directory) or error}") from error


def _tokenizer_files_problem(directory):
    """Which tokenizer file in `directory` cannot be parsed, and why; None when all look sound."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, ValueError) as error:
            return f"the tokenizer file {path} cannot be parsed as JSON ({error})"
        if name == "tokenizer.json" and not (isinstance(content, dict) and "model" in content):
            return f"the tokenizer file {path} cannot be parsed: it is JSON but has no tokenizer 'model'"
    return None
