"""Samples and batches: the token lists of one call as a `VLChatProcessorOutput`, samples padded into a batch.

`batchify` pads with torch itself (not `tokenizer.pad`), so `images_seq_mask` and
`attention_mask` are always bool, also for left-padded batches of unequal lengths (the reference
returns an int64 `images_seq_mask` there, which the model cannot use;
docs/deviations.md#padded-batches-keep-boolean-masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


@dataclass(frozen=True)
class SpecialIds:
    """The ids a sample or a batch is built with."""

    image_token_id: int
    pad_id: int
    eos_id: int
    ignore_id: int
    image_size: int


def make_sample(sft_format: str, ids: list, labels: list, seq_mask: list, tiles: list, spatial_crops: list,
                num_image_tokens: list, special: SpecialIds, inference_mode: bool = True) -> VLChatProcessorOutput:
    """The tensors of one sample. Labels are `ignore_id` on image ids; with `inference_mode` the
    final EOS (of the empty assistant turn) is dropped. No images: one zero tile and one zero grid."""
    # through numpy: torch.tensor reads a list of Python ints a few times slower, holding the interpreter
    # lock all along (about 0.1 ms per list of 2,000 here), while the server decodes on another thread
    input_ids = torch.from_numpy(np.array(ids, dtype=np.int64))
    target_ids = torch.from_numpy(np.array(labels, dtype=np.int64))
    images_seq_mask = torch.from_numpy(np.array(seq_mask, dtype=np.bool_))
    target_ids[(input_ids < 0) | (input_ids == special.image_token_id)] = special.ignore_id
    input_ids[input_ids < 0] = special.pad_id

    if inference_mode:
        if len(ids) == 0 or ids[-1] != special.eos_id:
            raise ValueError(
                "with inference_mode=True the conversation must end with an assistant "
                "message to be generated: append {'role': '<|Assistant|>', 'content': ''}")
        input_ids = input_ids[:-1]
        target_ids = target_ids[:-1]
        images_seq_mask = images_seq_mask[:-1]

    size = special.image_size
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


def batchify(samples, pad_id: int, ignore_id: int, padding="left") -> BatchCollateOutput:
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
    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, max_len), ignore_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)
    images_seq_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)
    for row, (sample, length) in enumerate(zip(samples, seq_lens)):
        columns = slice(max_len - length, max_len) if padding == "left" else slice(0, length)
        input_ids[row, columns] = sample.input_ids
        labels[row, columns] = sample.target_ids
        attention_mask[row, columns] = True
        images_seq_mask[row, columns] = sample.images_seq_mask
    if padding == "left":
        labels[labels == pad_id] = ignore_id
    else:
        attention_mask = input_ids != pad_id

    max_tiles = max(sample.images.shape[0] for sample in samples)
    images = torch.empty((batch_size, max_tiles, *samples[0].images.shape[1:]), dtype=samples[0].images.dtype)
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
