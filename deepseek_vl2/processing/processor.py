"""The DeepSeek-VL2 processor: chat text + PIL images -> token ids, image tiles and masks (the public facade).

`DeepseekVLV2Processor` keeps the reference's API and settings and hands each step to its module:
tokenizer changes and files (`tokenizer_setup`), tile grids and views (`image_tokens`, `tiling`),
ids (`tokenization`), chat turns (`chat_format`, `conversation`), tensors (`batching`).

Deviations from the official package (docs/deviations.md):

* `images=None` means "no images" on both the prompt and the conversations path
  (the reference crashes on the prompt path; docs/deviations.md#images-set-to-none-means-no-images).
* Bad input is refused up front, naming the argument and the message or image index: a non-str
  `prompt`, images of zero width or height, and more images than `<image>` tags (the reference
  silently ignores the extra images on the conversation path; the prompt path already refused
  them). The missing final assistant turn is a ValueError
  (docs/deviations.md#bad-input-raises-errors-that-name-it,
  docs/deviations.md#more-images-than-image-tags-are-refused).
* The class is a plain class rather than a transformers `ProcessorMixin`; `from_pretrained`
  loads the tokenizer with `PreTrainedTokenizerFast` (see `tokenizer_setup`;
  docs/deviations.md#the-processor-is-a-plain-class).
"""

from __future__ import annotations

import inspect

from . import chat_format, tokenizer_setup
from .batching import BatchCollateOutput, SpecialIds, VLChatProcessorOutput, batchify, make_sample
from .conversation import get_conv_template
from .image_tokens import ImageTokenInfo, uses_tiling
from .tiling import ImageTiler, rgb_images
from .tokenization import ImageTextTokenizer


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
        self.add_special_token = add_special_token  # a processor_config.json key; unused, as in the reference
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt
        self.ignore_id = ignore_id

        self.tokenizer = tokenizer
        self.image_token_id = tokenizer_setup.add_processor_tokens(tokenizer, pad_token, image_token)
        self.image_tokens = ImageTokenInfo(tuple(self.candidate_resolutions), patch_size, downsample_ratio)
        tiler = ImageTiler(self.image_size, self.image_mean, self.image_std, normalize)
        self.image_transform = tiler.transform
        self._tokens = ImageTextTokenizer(tokenizer, image_token, self.image_token_id, self.image_tokens, tiler)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **overrides):
        """Load from a local directory or a Hugging Face hub id: `processor_config.json` gives
        the constructor arguments (`overrides` replace them), the tokenizer files the tokenizer."""
        directory = tokenizer_setup.processor_directory(path_or_hub_id)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        kwargs = tokenizer_setup.read_processor_config(directory, accepted, overrides)
        return cls(tokenizer_setup.load_tokenizer(directory), **kwargs)

    def save_pretrained(self, save_directory):
        """Write `processor_config.json` and the (modified) tokenizer files."""
        tokenizer_setup.write_processor_config(save_directory, {
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
        })
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
        return self._tokens.encode(text, bos=bos, eos=eos)

    def decode(self, ids, **kwargs) -> str:
        return self._tokens.decode(ids, **kwargs)

    def tokenize_with_images(self, text: str, images, bos=True, eos=True, cropping=True):
        """See `ImageTextTokenizer.tokenize_with_images`: `(ids, tiles, images_seq_mask, spatial_crops,
        num_image_tokens)` as lists."""
        return self._tokens.tokenize_with_images(text, images, bos=bos, eos=eos, cropping=cropping)

    # ------------------------------------------------------------------ chat formatting

    def new_chat_template(self):
        return get_conv_template(self.sft_format)

    def format_messages(self, conversations, sft_format="deepseek", system_prompt=""):
        """The display string of a whole conversation (roles used verbatim), stripped."""
        return chat_format.format_messages(conversations, sft_format, system_prompt)

    def format_prompts(self, prompts, sft_format="deepseek", system_prompt=""):
        """The display string of one user turn followed by an empty assistant turn, stripped."""
        return chat_format.format_prompts(prompts, sft_format, system_prompt)

    def format_messages_v2(self, messages, pil_images, systems=None):
        """Tokenize a conversation turn by turn: `(ids, labels, tiles, images_seq_mask, spatial_crops,
        num_image_tokens)` as lists. `systems` is the reference's argument, accepted and unused (as
        there): the caller's system prompt only shows in the display string."""
        return chat_format.tokenize_conversation(messages, pil_images, self._tokens, self.sft_format,
                                                 self.mask_prompt, self.ignore_id)

    # ------------------------------------------------------------------ samples and batches

    def process_one(self, prompt=None, conversations=None, images=None, apply_sft_format=False,
                    inference_mode=True, system_prompt=""):
        """Build one `VLChatProcessorOutput` from `conversations` (list of {"role", "content"})
        or from a ready `prompt` string, plus the PIL `images` in tag order."""
        if (prompt is None) == (conversations is None):
            raise ValueError("pass exactly one of `prompt` and `conversations`"
                             + (" (both were given)" if prompt is not None else " (neither was given)"))
        if conversations is not None:
            chat_format.check_conversations(conversations, self.sft_format, self.image_token)
        elif not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
        if system_prompt is None:
            system_prompt = ""
        elif not isinstance(system_prompt, str):
            raise TypeError(f"`system_prompt` must be a str, got {type(system_prompt).__name__}")
        images = rgb_images(images)

        if conversations is not None:
            sft_format = self.format_messages(conversations, self.sft_format, system_prompt)
            ids, labels, tiles, seq_mask, spatial_crops, num_image_tokens = self.format_messages_v2(
                conversations, images)
        else:
            sft_format = self.format_prompts(prompt, self.sft_format, system_prompt) \
                if apply_sft_format else prompt
            ids, tiles, seq_mask, spatial_crops, num_image_tokens = self.tokenize_with_images(
                sft_format, images, bos=True, eos=True, cropping=uses_tiling(len(images)))
            labels = [self.ignore_id if masked else i for i, masked in zip(ids, seq_mask)]

        special = SpecialIds(self.image_token_id, self.pad_id, self.eos_id, self.ignore_id, self.image_size)
        return make_sample(sft_format, ids, labels, seq_mask, tiles, spatial_crops, num_image_tokens, special,
                           inference_mode=inference_mode)

    def __call__(self, *, prompt=None, conversations=None, images=None, apply_sft_format=False,
                 force_batchify=True, inference_mode=True, system_prompt=""):
        sample = self.process_one(prompt=prompt, conversations=conversations, images=images,
                                  apply_sft_format=apply_sft_format, inference_mode=inference_mode,
                                  system_prompt=system_prompt)
        return self.batchify([sample]) if force_batchify else sample

    def batchify(self, samples, padding="left") -> BatchCollateOutput:
        """Pad and stack samples (see `batching.batchify`); left padding by default, for generation."""
        return batchify(samples, self.pad_id, self.ignore_id, padding)


__all__ = ["DeepseekVLV2Processor", "VLChatProcessorOutput", "BatchCollateOutput"]
