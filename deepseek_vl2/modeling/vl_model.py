"""DeepSeek-VL2: the vision tower and projector turn image tiles into embeddings that are written
into the text embeddings at the `<image>` positions, and the DeepSeek-V2 decoder runs on the result.

    prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        tiles of every image -> SigLIP tower -> projector -> per-image layout with image_newline /
        view_seperator (tile_layout.py) -> written into embed_tokens(input_ids)
    forward(...)            -> language model forward (float32 logits)
    incremental_prefilling  -> chunked prefill returning (inputs_embeds, cache) (generation/generate.py)
    generate(...)           -> generation/generate.py

Importing this module registers the configs with AutoConfig and the model with
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(path)` works on the official
checkpoints (whose config.json names no code).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..generation.generate import GenerationMixin
from ..weights import loading
from ..weights.checkpoint import save_weights
from .decoder import DeepseekV2ForCausalLM
from .devices import hop, module_device
from .input_checks import check_image_inputs, check_input_ids
from .projector import MlpProjector
from .tile_layout import image_sequence, real_crops
from .vision import build_vision_tower, tower_features
from .vl_config import DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig

__all__ = [
    "VisionEncoderConfig", "MlpProjectorConfig", "DeepseekVLV2Config", "MlpProjector", "DeepseekVLV2ForCausalLM",
]


@dataclass
class ImagePrompt:
    """A batch's token embeddings before its image vectors are written (`image_prompt`)."""

    embeds: torch.Tensor  # [B, T, hidden]
    tiles: Optional[torch.Tensor] = None  # every image tile of the batch, in row order (None: no image)
    crops: list = field(default_factory=list)  # images_spatial_crop as lists
    tiles_per_row: List[int] = field(default_factory=list)
    seq_mask: Optional[torch.Tensor] = None  # images_seq_mask, bool on the host


class DeepseekVLV2ForCausalLM(GenerationMixin, nn.Module):
    config_class = DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    _no_split_modules = ["DecoderLayer", "VisionTransformer", "MlpProjector"]  # kept whole by device maps

    def __init__(self, config: DeepseekVLV2Config):
        super().__init__()
        if config.tile_tag != "2D":
            raise ValueError(f"tile_tag {config.tile_tag!r} is not supported; only '2D' is (the reference's '1D' "
                             f"branch cannot run either)")
        if config.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos must be 'head' or 'tail', not {config.global_view_pos!r}")
        self.config = config
        self.vision = build_vision_tower(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        width = config.projector_config.n_embed
        self.image_newline = nn.Parameter(torch.randn(width) * width**-0.5)
        self.view_seperator = nn.Parameter(torch.randn(width) * width**-0.5)  # sic: the checkpoint's name
        self.language = DeepseekV2ForCausalLM(config.language_config)

    # ---- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, torch_dtype=None,
                        dtype=None, device_map=None, **kwargs):
        """Load an official checkpoint (local directory or hub id) strictly.

        dtype / torch_dtype: torch.float32, torch.bfloat16, torch.float16 or "auto" (default: the
        checkpoint's, bfloat16). device_map: "cpu" (default), "cuda", "cuda:N", a GPU index, "auto",
        "balanced", "balanced_low_0", "sequential" (spread over the GPUs, within `max_memory`) or a
        {module name: device} dict; see weights/placement.py. On a GPU the first answer's one-time
        costs (kernel loading, library set-up, graph capture) are paid here; `warm_up=False` skips
        that (generation/warmup.py)."""
        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args}")
        return loading.from_pretrained(cls, pretrained_model_name_or_path, config=config,
                                       dtype=dtype if dtype is not None else torch_dtype,
                                       device_map=device_map, **kwargs)

    def save_pretrained(self, save_directory, max_shard_size: int = 5 * 1024**3, **unused) -> None:
        """Write config.json and the weights in the official format; the weight files and index of a
        checkpoint already in `save_directory` are replaced (other files are left alone)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        setattr(self.config, loading.dtype_field(self.config), str(self.dtype).replace("torch.", ""))
        self.config.save_pretrained(str(save_directory))
        save_weights(self, save_directory, max_shard_bytes=max_shard_size)

    @property
    def device(self) -> torch.device:
        return self.language.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.dtype

    # ---- images to embeddings -------------------------------------------------------------------

    def prepare_inputs_embeds(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None,
                              **ignored):
        """Token embeddings with the image vectors written, in order, at the True positions of
        `images_seq_mask` (one row per batch row). Shapes (the processor's batch): input_ids [B, T],
        images [B, tiles, 3, 384, 384], images_seq_mask [B, T], images_spatial_crop [B, images, 2].
        A ValueError names the argument whose shape or content does not fit. The inputs may be on the
        host for a model on a GPU: they are copied without waiting for it."""
        prompt = self.image_prompt(input_ids, images, images_seq_mask, images_spatial_crop)
        if prompt.tiles is None:
            return prompt.embeds
        return self.place_images(prompt, tower_features(self.vision, prompt.tiles))

    def image_prompt(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None) -> "ImagePrompt":
        """The first half of `prepare_inputs_embeds`: its checks, the token embeddings and the batch's
        tiles on the tower's device (a caller may then run the tower in pieces, vision.TowerPieces)."""
        embedding = self.language.get_input_embeddings()
        check_input_ids(input_ids, embedding.num_embeddings)
        has_image_slots = check_image_inputs(input_ids.shape, images, images_seq_mask, images_spatial_crop)
        embeds = embedding(input_ids.to(embedding.weight.device, non_blocking=True))
        if not has_image_slots:
            return ImagePrompt(embeds)
        # the layout is read on the host: free for inputs given there (the continuous engine's), one
        # read back each for inputs on the device
        crops = images_spatial_crop.tolist()
        seq_mask = images_seq_mask.to("cpu", torch.bool)
        tiles_per_row = [sum(1 + w * h for w, h in real_crops(row)) for row in crops]
        rows_with_slots = seq_mask.any(dim=1).tolist()
        for b, tiles in enumerate(tiles_per_row):
            if tiles > images.shape[1]:
                raise ValueError(f"batch row {b}: images_spatial_crop {real_crops(crops[b])} needs {tiles} tiles "
                                 f"but images holds {images.shape[1]} per row")
            if not tiles and rows_with_slots[b]:
                raise ValueError(f"batch row {b}: images_seq_mask marks image positions but "
                                 "images_spatial_crop lists no image for this row")
        if sum(tiles_per_row) == 0:
            return ImagePrompt(embeds)
        parts = [images[b, :n] for b, n in enumerate(tiles_per_row) if n]
        tiles = parts[0] if len(parts) == 1 else torch.cat(parts)  # one row: its (maybe pinned) memory as is
        if tiles.shape[0] and tuple(tiles.shape[1:]) != (3, self.vision.patch_embed.img_size[0],
                                                         self.vision.patch_embed.img_size[1]):
            raise ValueError(f"image tiles have shape {tuple(tiles.shape[1:])}; expected "
                             f"(3, {self.vision.patch_embed.img_size[0]}, {self.vision.patch_embed.img_size[1]})")
        vision_weight = self.vision.patch_embed.proj.weight
        tiles = tiles.to(device=vision_weight.device, dtype=vision_weight.dtype, non_blocking=True)
        return ImagePrompt(embeds, tiles, crops, tiles_per_row, seq_mask)

    def place_images(self, prompt: "ImagePrompt", features: torch.Tensor) -> torch.Tensor:
        """The second half: the tower's `features` of `prompt.tiles` through the projector, laid out per
        image and written at the image positions of `prompt.embeds` (returned)."""
        projector_device = module_device(self.projector)
        if projector_device is not None:  # a device_map may put the projector elsewhere
            features = hop(features, projector_device)
        embeds = prompt.embeds
        projected = self.projector(features).to(device=embeds.device, dtype=embeds.dtype)
        start = 0
        for b, row in enumerate(prompt.crops):
            if not prompt.tiles_per_row[b]:
                continue
            vectors = image_sequence(projected[start : start + prompt.tiles_per_row[b]], real_crops(row),
                                     self.image_newline, self.view_seperator, self.config.global_view_pos)
            start += prompt.tiles_per_row[b]
            positions = prompt.seq_mask[b].nonzero().squeeze(1)
            if positions.numel() != len(vectors):
                raise ValueError(f"batch row {b}: images_seq_mask marks {positions.numel()} image positions but its "
                                 f"images give {len(vectors)} vectors (was the prompt made by this checkpoint's "
                                 "processor?)")
            embeds[b].index_copy_(0, positions.to(embeds.device, non_blocking=True), vectors)
        return embeds

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, images=None, images_seq_mask=None, images_spatial_crop=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: int = 0, **unused):
        """As the reference: builds inputs_embeds from ids + images when not given, then runs the
        language model. `use_cache` defaults to the language config's (the reference raises;
        docs/deviations.md#use_cache-defaults-to-the-config)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with images) or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        return self.language(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict, logits_to_keep=logits_to_keep)

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return DeepseekV2ForCausalLM._reorder_cache(past_key_values, beam_idx)


def _register() -> None:
    """Register with the Auto classes, leaving alone any model type transformers already knows."""
    for config_class in (VisionEncoderConfig, MlpProjectorConfig, DeepseekVLV2Config):
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # a model type transformers has (or this module was reloaded)
            pass
    try:
        AutoModelForCausalLM.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register()
