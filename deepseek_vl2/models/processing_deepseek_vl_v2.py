"""DeepSeek-VL2 processor: chat text + PIL images -> token ids, image tiles and masks.

Per image, the processor picks a tile grid (`select_best_resolution`), makes one global
384x384 view plus nw x nh local 384x384 crops (Pillow's `ImageOps.pad`, pad colour from the
image mean), normalises them, and puts `N_img = h*(w+1) + 1 + (nh*h)*(nw*w+1)` copies of the
`<image>` token id where the `<image>` tag stood (h = w = 14 for the released checkpoints).
Text around the tags is tokenized piece by piece. `batchify` collates samples into padded
batch tensors.

Deviations from the reference implementation (all allowed by the spec):

* P-PROC-4: `batchify` pads with torch itself (not `tokenizer.pad`), so `images_seq_mask` and
  `attention_mask` are always bool, also for left-padded batches of unequal lengths (the
  reference returns an int64 `images_seq_mask` there, which the model cannot use).
* P-PROC-13: `images=None` means "no images" on both the prompt and the conversations path
  (the reference crashes on the prompt path).
* P-PROC-14: the special-token ids found or added at construction are reported through
  `logging` (logger `deepseek_vl2.models.processing_deepseek_vl_v2`), not printed.
* Reference assertions are ValueErrors with messages that name the problem (image tag count,
  unknown role, misplaced system message, `<image>` in an answer, missing final assistant
  turn, bad image objects). Non-RGB PIL images are converted to RGB instead of failing later.
* Bad input is refused up front, naming the argument and the message or image index: a
  conversation that is not a list of {"role": str, "content": str} dicts (TypeError, or
  ValueError for a missing key), one without a user message, a non-str `prompt`, images of zero
  width or height, and more images than `<image>` tags (the reference silently ignores the
  extra images on the conversation path; the prompt path already refused them). Unreadable
  `processor_config.json` / `tokenizer.json` files are reported with their path.
* The class is a plain class rather than a transformers `ProcessorMixin`; `from_pretrained`
  loads the tokenizer with `PreTrainedTokenizerFast` (under transformers 5.x the
  `LlamaTokenizerFast` class named in the checkpoints re-tokenizes their byte-level
  `tokenizer.json` wrongly and loses spaces and newlines).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import AddedToken

from .conversation import get_conv_template

logger = logging.getLogger(__name__)

GROUNDING_TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
CHAT_ROLE_TOKENS = ["<|User|>", "<|Assistant|>"]
SYSTEM_ROLES = ("system", "deepseekapi-sys")
PROCESSOR_CONFIG_NAME = "processor_config.json"


def select_best_resolution(image_size, candidate_resolutions):
    """The candidate (width, height) that keeps most of the image's pixels, then wastes least.

    `image_size` is the original (width, height). Effective pixels never credit upscaling; ties
    on both measures keep the earlier candidate.
    """
    original_width, original_height = image_size
    best_fit = None
    best_effective = 0
    best_wasted = float("inf")
    for width, height in candidate_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled_width = int(original_width * scale)
        scaled_height = int(original_height * scale)
        effective = min(scaled_width * scaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best_fit = (width, height)
            best_effective = effective
            best_wasted = wasted
    return best_fit


class ImageTransform:
    """PIL RGB image -> float32 [3, H, W] tensor in [0, 1], then `(x - mean) / std` per channel.

    The arithmetic (uint8 -> float32, divide by 255, subtract, divide) is the one of
    torchvision's ToTensor + Normalize, so the values are bit-identical to it.
    """

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), normalize=True):
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        tensor = pixels.to(torch.float32).div_(255)
        if self.normalize:
            tensor.sub_(self._mean).div_(self._std)
        return tensor


class DictOutput:
    """Dict-style access to the instance attributes, so that `**output` unpacking works."""

    def keys(self):
        return self.__dict__.keys()

    def __getitem__(self, key):
        return self.__dict__[key]

    def __setitem__(self, key, value):
        self.__dict__[key] = value


@dataclass
class VLChatProcessorOutput(DictOutput):
    """One processed sample (unbatched)."""

    sft_format: str
    input_ids: torch.LongTensor
    target_ids: torch.LongTensor
    images: torch.Tensor
    images_seq_mask: torch.BoolTensor
    images_spatial_crop: torch.LongTensor
    num_image_tokens: list

    def __len__(self):
        return len(self.input_ids)


@dataclass
class BatchCollateOutput(DictOutput):
    """A padded batch, ready for `DeepseekVLV2ForCausalLM`."""

    sft_format: list
    input_ids: torch.LongTensor
    labels: torch.LongTensor
    images: torch.Tensor
    attention_mask: torch.BoolTensor
    images_seq_mask: torch.BoolTensor
    images_spatial_crop: torch.LongTensor
    seq_lens: list

    def to(self, device, dtype=torch.bfloat16):
        """Move every tensor to `device`; `images` are also cast to `dtype` (bf16 by default,
        so pass `dtype=torch.float32` for a float32 model). Returns self."""
        self.input_ids = self.input_ids.to(device)
        self.labels = self.labels.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.images_seq_mask = self.images_seq_mask.to(device)
        self.images_spatial_crop = self.images_spatial_crop.to(device)
        self.images = self.images.to(device=device, dtype=dtype)
        return self


def _check_images(images) -> list:
    """`images` (None, or a list / tuple of PIL images) as a list; errors name the image index."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        raise ValueError("`images` must be a list of PIL images, got a single image; wrap it in a list")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"`images` must be a list of PIL images (or None), got {type(images).__name__}")
    return [_as_rgb(image, i) for i, image in enumerate(images)]


def _as_rgb(image, index):
    if not isinstance(image, Image.Image):
        raise ValueError(f"image {index} is a {type(image).__name__}, expected a PIL.Image.Image")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {index} is {image.width}x{image.height} pixels; width and height must be at "
                         "least 1")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"image {index} (mode {image.mode!r}) cannot be converted to RGB: {error}") from error


class DeepseekVLV2Processor:
    """Turns conversations or prompts plus PIL images into DeepSeek-VL2 model inputs."""

    def __init__(
        self,
        tokenizer,
        candidate_resolutions,
        patch_size,
        downsample_ratio,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        normalize=True,
        image_token="<image>",
        pad_token="<｜▁pad▁｜>",
        add_special_token=False,
        sft_format="deepseek",
        mask_prompt=True,
        ignore_id=-100,
    ):
        self.candidate_resolutions = [tuple(resolution) for resolution in candidate_resolutions]
        if not self.candidate_resolutions or any(len(r) != 2 or min(r) < 1 for r in self.candidate_resolutions):
            raise ValueError("candidate_resolutions must be a non-empty list of (width, height) pairs, got "
                             f"{candidate_resolutions!r}")
        get_conv_template(sft_format)  # an unknown template name raises here, listing the known ones
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.normalize = normalize
        self.image_token = image_token
        self.pad_token = pad_token
        self.add_special_token = add_special_token
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt
        self.ignore_id = ignore_id
        self.image_transform = ImageTransform(image_mean, image_std, normalize)
        self.pad_color = tuple(int(m * 255) for m in self.image_mean)

        # Tokenizer changes, in the reference's order (ids depend on it).
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": _special(pad_token)})
        logger.info("pad token %r has id %s", tokenizer.pad_token, tokenizer.pad_token_id)

        image_token_id = tokenizer.get_vocab().get(image_token)
        if image_token_id is None:
            tokenizer.add_special_tokens({"additional_special_tokens": [_special(image_token)]})
            image_token_id = tokenizer.get_vocab()[image_token]
        self.image_token_id = image_token_id
        logger.info("image token %r has id %s", image_token, image_token_id)

        # Each call replaces the tokenizer's additional-special-token list (as the reference
        # does); every token stays in the vocabulary as a special added token.
        for group in (GROUNDING_TOKENS, CHAT_ROLE_TOKENS):
            tokenizer.add_special_tokens({"additional_special_tokens": [_special(t) for t in group]})
            logger.info("special tokens %s", {t: tokenizer.convert_tokens_to_ids(t) for t in group})

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **overrides):
        """Load from a local directory or a Hugging Face hub id: `processor_config.json` gives
        the constructor arguments (`overrides` replace them), the tokenizer files the tokenizer."""
        from transformers import PreTrainedTokenizerFast

        if not isinstance(path_or_hub_id, (str, os.PathLike)):
            raise TypeError("from_pretrained needs a directory path or a hub id (str), got "
                            f"{type(path_or_hub_id).__name__}")
        path_or_hub_id = os.fspath(path_or_hub_id)
        if not os.path.isdir(path_or_hub_id):
            # a hub id: fetched as the model's files are (the local cache when offline), same errors
            from .checkpoint import PROCESSOR_PATTERNS, resolve_checkpoint_dir

            path_or_hub_id = str(resolve_checkpoint_dir(path_or_hub_id, allow_patterns=PROCESSOR_PATTERNS))
        config_path = os.path.join(path_or_hub_id, PROCESSOR_CONFIG_NAME)
        with open(config_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except ValueError as error:
                raise ValueError(f"cannot parse the processor config {config_path}: {error}") from error
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, not a {type(config).__name__}")
        missing = [key for key in ("candidate_resolutions", "patch_size", "downsample_ratio")
                   if key not in config and key not in overrides]
        if missing:
            raise ValueError(f"{config_path} lacks the required keys {missing}")

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        ignored = sorted(set(config) - accepted - {"processor_class"})
        if ignored:
            logger.warning("ignoring unknown keys in %s: %s", PROCESSOR_CONFIG_NAME, ignored)
        kwargs = {key: value for key, value in config.items() if key in accepted}
        kwargs.update(overrides)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path_or_hub_id)
        except Exception as error:  # the tokenizers library raises a bare Exception on bad JSON
            tokenizer_file = os.path.join(path_or_hub_id, "tokenizer.json")
            if not os.path.isfile(tokenizer_file):
                raise FileNotFoundError(f"cannot load the tokenizer: {tokenizer_file} does not exist") from error
            raise ValueError(f"cannot load the tokenizer from {path_or_hub_id!r}: "
                             f"{_tokenizer_files_problem(path_or_hub_id) or error}") from error
        return cls(tokenizer, **kwargs)

    def save_pretrained(self, save_directory):
        """Write `processor_config.json` and the (modified) tokenizer files."""
        os.makedirs(save_directory, exist_ok=True)
        config = {
            "add_special_token": self.add_special_token,
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "downsample_ratio": self.downsample_ratio,
            "ignore_id": self.ignore_id,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "image_token": self.image_token,
            "mask_prompt": self.mask_prompt,
            "normalize": self.normalize,
            "pad_token": self.pad_token,
            "patch_size": self.patch_size,
            "processor_class": type(self).__name__,
            "sft_format": self.sft_format,
        }
        with open(os.path.join(save_directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        self.tokenizer.save_pretrained(save_directory)

    # ------------------------------------------------------------------ tokenizer helpers

    @property
    def bos_id(self):
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self):
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self):
        return self.tokenizer.pad_token_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    # ------------------------------------------------------------------ chat formatting

    def new_chat_template(self):
        return get_conv_template(self.sft_format)

    def check_conversations(self, conversations) -> None:
        """Raise TypeError / ValueError, naming the message index, unless `conversations` is a
        non-empty list of {"role": str, "content": str} dicts with known roles and a user message."""
        if not isinstance(conversations, (list, tuple)):
            raise TypeError("`conversations` must be a list of {'role': ..., 'content': ...} dicts, got "
                            f"{type(conversations).__name__}")
        if len(conversations) == 0:
            raise ValueError("`conversations` is empty")
        user_roles, assistant_roles = self._roles()
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
            if message["role"] not in user_roles and self.image_token in message["content"]:
                raise ValueError(f"message {index} ({message['role']!r}) contains {self.image_token}; images may "
                                 "only appear in user messages")
        if not any(message["role"] in user_roles for message in conversations):
            raise ValueError(f"the conversation has no user message (role {user_roles[0]!r} or 'user'); "
                             "there is nothing to answer")

    def _roles(self):
        """(user roles, assistant roles) of the chat template, each with its plain alias."""
        user_role, assistant_role = self.new_chat_template().roles
        return (user_role, "user"), (assistant_role, "assistant")

    def format_messages(self, conversations, sft_format="deepseek", system_prompt=""):
        """The display string of a whole conversation (roles used verbatim), stripped."""
        conv = get_conv_template(sft_format)
        conv.set_system_message(system_prompt)
        for message in conversations:
            conv.append_message(message["role"], message["content"].strip())
        return conv.get_prompt().strip()

    def format_prompts(self, prompts, sft_format="deepseek", system_prompt=""):
        """The display string of one user turn followed by an empty assistant turn, stripped."""
        conv = get_conv_template(sft_format)
        conv.set_system_message(system_prompt)
        conv.append_message(conv.roles[0], prompts.strip())
        conv.append_message(conv.roles[1], "")
        return conv.get_prompt().strip()

    def format_messages_v2(self, messages, pil_images, systems=None):
        """Tokenize a conversation turn by turn.

        Returns `(ids, labels, tiles, images_seq_mask, spatial_crops, num_image_tokens)` as
        lists. The caller's system prompt is not used here (only the display string has it);
        `systems` is accepted for API compatibility and ignored.
        """
        conv = self.new_chat_template()
        template_system_message = conv.system_message
        user_role, assistant_role = conv.roles
        user_roles, assistant_roles = self._roles()
        cropping = len(pil_images) <= 2
        tag = self.image_token

        total_tags = sum(str(m["content"]).count(tag) for m in messages
                         if m["role"] in user_roles)
        if total_tags != len(pil_images):
            raise ValueError(
                f"the conversation has {total_tags} {tag} tags but {len(pil_images)} "
                f"images were given; pass one image per {tag} tag"
            )

        ids, labels, seq_mask = [], [], []
        tiles, spatial_crops, num_image_tokens = [], [], []
        remaining_images = list(pil_images)
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if index == 0:
                ids.append(self.bos_id)
                labels.append(self.bos_id)
                seq_mask.append(False)

            if role in user_roles:
                conv.reset_message()
                conv.set_system_message(template_system_message if index == 0 else "")
                conv.append_message(user_role, str(content).strip())
                conv.append_message(assistant_role, "")
                text = conv.get_prompt()
                n_tags = text.count(tag)
                turn_images, remaining_images = remaining_images[:n_tags], remaining_images[n_tags:]
                turn_ids, turn_tiles, turn_mask, turn_crops, turn_counts = self.tokenize_with_images(
                    text, turn_images, bos=False, eos=False, cropping=cropping)
                turn_labels = [self.ignore_id] * len(turn_ids) if self.mask_prompt else turn_ids
                tiles += turn_tiles
                spatial_crops += turn_crops
                num_image_tokens += turn_counts
            elif role in assistant_roles:
                answer = content.strip()
                if tag in answer:
                    raise ValueError(
                        f"message {index} ({role!r}) contains {tag}; images may only "
                        "appear in user messages")
                turn_ids = self.encode(answer, bos=False, eos=True)
                turn_labels = turn_ids
                turn_mask = [False] * len(turn_ids)
            elif role in SYSTEM_ROLES:
                if index != 0:
                    raise ValueError(
                        f"message {index} has role {role!r}; a system message is only allowed "
                        "as the first message")
                turn_ids = self.encode(content.strip(), bos=False, eos=False)
                turn_labels = [self.ignore_id] * len(turn_ids) if self.mask_prompt else turn_ids
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

    # ------------------------------------------------------------------ images

    def num_image_tokens_for(self, num_width_tiles: int, num_height_tiles: int) -> int:
        """Image-token count of one image: global rows + newlines, separator, local rows + newlines."""
        side = math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)
        global_tokens = side * (side + 1)
        local_tokens = (num_height_tiles * side) * (num_width_tiles * side + 1)
        return global_tokens + 1 + local_tokens

    def image_views(self, image: Image.Image, cropping: bool = True):
        """Global view plus row-major local crops (tensors), and the grid (nw, nh)."""
        size = self.image_size
        if cropping:
            best_width, best_height = select_best_resolution(image.size, self.candidate_resolutions)
        else:
            best_width, best_height = size, size

        global_view = self.image_transform(ImageOps.pad(image, (size, size), color=self.pad_color))
        if (best_width, best_height) == (size, size):
            local_canvas = global_view
        else:
            local_canvas = self.image_transform(
                ImageOps.pad(image, (best_width, best_height), color=self.pad_color))
        views = [global_view]
        for top in range(0, best_height, size):
            for left in range(0, best_width, size):
                views.append(local_canvas[:, top:top + size, left:left + size])
        return views, (best_width // size, best_height // size)

    def tokenize_with_images(self, text: str, images, bos=True, eos=True, cropping=True):
        """Tokenize `text`, replacing each image tag (`image_token`, "<image>") by the image's
        token block. Text pieces between tags are tokenized separately.

        Returns `(ids, tiles, images_seq_mask, spatial_crops, num_image_tokens)` as lists.
        """
        tag = self.image_token
        pieces = text.split(tag)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"the text has {len(pieces) - 1} {tag} tags but {len(images)} images "
                f"were given; pass one image per {tag} tag")

        ids, seq_mask, tiles, spatial_crops, num_image_tokens = [], [], [], [], []
        for piece, image in zip(pieces, images):
            piece_ids = self.encode(piece, bos=False, eos=False)
            ids += piece_ids
            seq_mask += [False] * len(piece_ids)

            views, (num_width_tiles, num_height_tiles) = self.image_views(image, cropping)
            tiles += views
            spatial_crops.append([num_width_tiles, num_height_tiles])
            count = self.num_image_tokens_for(num_width_tiles, num_height_tiles)
            num_image_tokens.append(count)
            ids += [self.image_token_id] * count
            seq_mask += [True] * count

        last_ids = self.encode(pieces[-1], bos=False, eos=False)
        ids += last_ids
        seq_mask += [False] * len(last_ids)
        if bos:
            ids = [self.bos_id] + ids
            seq_mask = [False] + seq_mask
        if eos:
            ids = ids + [self.eos_id]
            seq_mask = seq_mask + [False]
        return ids, tiles, seq_mask, spatial_crops, num_image_tokens

    # ------------------------------------------------------------------ samples and batches

    def process_one(self, prompt=None, conversations=None, images=None, apply_sft_format=False,
                    inference_mode=True, system_prompt=""):
        """Build one `VLChatProcessorOutput` from `conversations` (list of {"role", "content"})
        or from a ready `prompt` string, plus the PIL `images` in tag order."""
        if (prompt is None) == (conversations is None):
            raise ValueError("pass exactly one of `prompt` and `conversations`"
                             + (" (both were given)" if prompt is not None else " (neither was given)"))
        if conversations is not None:
            self.check_conversations(conversations)
        elif not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
        if system_prompt is None:
            system_prompt = ""
        elif not isinstance(system_prompt, str):
            raise TypeError(f"`system_prompt` must be a str, got {type(system_prompt).__name__}")
        images = _check_images(images)

        if conversations is not None:
            sft_format = self.format_messages(conversations, self.sft_format, system_prompt)
            ids, labels, tiles, seq_mask, spatial_crops, num_image_tokens = self.format_messages_v2(
                conversations, images)
        else:
            sft_format = self.format_prompts(prompt, self.sft_format, system_prompt) \
                if apply_sft_format else prompt
            ids, tiles, seq_mask, spatial_crops, num_image_tokens = self.tokenize_with_images(
                sft_format, images, bos=True, eos=True, cropping=len(images) <= 2)
            labels = [self.ignore_id if masked else i for i, masked in zip(ids, seq_mask)]

        input_ids = torch.tensor(ids, dtype=torch.long)
        target_ids = torch.tensor(labels, dtype=torch.long)
        images_seq_mask = torch.tensor(seq_mask, dtype=torch.bool)
        target_ids[(input_ids < 0) | (input_ids == self.image_token_id)] = self.ignore_id
        input_ids[input_ids < 0] = self.pad_id

        if inference_mode:
            if len(ids) == 0 or ids[-1] != self.eos_id:
                raise ValueError(
                    "with inference_mode=True the conversation must end with an assistant "
                    "message to be generated: append {'role': '<|Assistant|>', 'content': ''}")
            input_ids = input_ids[:-1]
            target_ids = target_ids[:-1]
            images_seq_mask = images_seq_mask[:-1]

        size = self.image_size
        if tiles:
            images_tensor = torch.stack(tiles)
            spatial_crop_tensor = torch.tensor(spatial_crops, dtype=torch.long)
        else:
            images_tensor = torch.zeros((1, 3, size, size), dtype=torch.float32)
            spatial_crop_tensor = torch.zeros((1, 2), dtype=torch.long)

        return VLChatProcessorOutput(
            sft_format=sft_format,
            input_ids=input_ids,
            target_ids=target_ids,
            images=images_tensor,
            images_seq_mask=images_seq_mask,
            images_spatial_crop=spatial_crop_tensor,
            num_image_tokens=num_image_tokens,
        )

    def __call__(self, *, prompt=None, conversations=None, images=None, apply_sft_format=False,
                 force_batchify=True, inference_mode=True, system_prompt=""):
        sample = self.process_one(prompt=prompt, conversations=conversations, images=images,
                                  apply_sft_format=apply_sft_format, inference_mode=inference_mode,
                                  system_prompt=system_prompt)
        return self.batchify([sample]) if force_batchify else sample

    def batchify(self, samples, padding="left") -> BatchCollateOutput:
        """Pad and stack samples. Left padding (the default, for generation) fills ids with
        `pad_id`; labels that equal `pad_id` become `ignore_id`. Right padding fills labels with
        `ignore_id` and derives the attention mask from `input_ids != pad_id`. Image tiles and
        spatial-crop rows are padded with zeros."""
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        if not isinstance(samples, (list, tuple)):
            raise TypeError(f"batchify takes a list of samples from process_one, got {type(samples).__name__}")
        if not samples:
            raise ValueError("batchify needs at least one sample")
        for index, sample in enumerate(samples):
            if not isinstance(sample, VLChatProcessorOutput):
                raise TypeError(f"batchify: sample {index} is a {type(sample).__name__}, expected a "
                                "VLChatProcessorOutput (from process_one, or __call__ with force_batchify=False)")

        seq_lens = [len(sample) for sample in samples]
        batch_size, max_len = len(samples), max(seq_lens)
        input_ids = torch.full((batch_size, max_len), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, max_len), self.ignore_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)
        images_seq_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)
        for row, (sample, length) in enumerate(zip(samples, seq_lens)):
            columns = slice(max_len - length, max_len) if padding == "left" else slice(0, length)
            input_ids[row, columns] = sample.input_ids
            labels[row, columns] = sample.target_ids
            attention_mask[row, columns] = True
            images_seq_mask[row, columns] = sample.images_seq_mask
        if padding == "left":
            labels[labels == self.pad_id] = self.ignore_id
        else:
            attention_mask = input_ids != self.pad_id

        max_tiles = max(sample.images.shape[0] for sample in samples)
        images = torch.empty((batch_size, max_tiles, *samples[0].images.shape[1:]),
                             dtype=samples[0].images.dtype)
        max_images = max(sample.images_spatial_crop.shape[0] for sample in samples)
        images_spatial_crop = torch.zeros((batch_size, max_images, 2), dtype=torch.long)
        for row, sample in enumerate(samples):
            num_tiles = sample.images.shape[0]
            images[row, :num_tiles] = sample.images
            images[row, num_tiles:] = 0
            images_spatial_crop[row, :sample.images_spatial_crop.shape[0]] = sample.images_spatial_crop

        return BatchCollateOutput(
            sft_format=[sample.sft_format for sample in samples],
            input_ids=input_ids,
            labels=labels,
            images=images,
            attention_mask=attention_mask,
            images_seq_mask=images_seq_mask,
            images_spatial_crop=images_spatial_crop,
            seq_lens=seq_lens,
        )


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


def _special(token: str) -> AddedToken:
    """A special token that matches only its exact text and never absorbs whitespace."""
    return AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
