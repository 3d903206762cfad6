"""Checks of the tensors given to the models' public entry points (forward, generate,
prepare_inputs_embeds, incremental_prefilling): token ids, embeddings and image inputs. A wrong
type, shape or token id raises a TypeError / ValueError naming the argument before any compute,
rather than an error from deep inside (for an id outside the vocabulary, an IndexError from the
embedding lookup; on CUDA, a device-side assert that breaks every later CUDA call)."""
import torch


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """Token ids must be a non-empty integer tensor [batch, length] inside [0, vocab_size): an id
    outside would make the embedding lookup fail (on CUDA, with a device-side assert that breaks
    every later CUDA call of the process). One min/max over the ids."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor [batch, length], got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"{name} must have shape [batch, length] with at least one token, got "
                         f"{tuple(input_ids.shape)}")
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds the token id {low if low < 0 else high}, outside the vocabulary "
                         f"[0, {vocab_size}) (vocab_size={vocab_size})")


def check_inputs_embeds(inputs_embeds, hidden_size: int) -> None:
    """Embeddings must be a floating tensor [batch, length, hidden_size] with at least one position."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a tensor [batch, length, {hidden_size}], got "
                        f"{type(inputs_embeds).__name__}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size or inputs_embeds.shape[1] == 0:
        raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected [batch, length, "
                         f"{hidden_size}] with length >= 1")


def check_image_inputs(ids_shape, images, images_seq_mask, images_spatial_crop) -> bool:
    """Whether there are image positions to fill; ValueError / TypeError naming the argument when the
    image inputs are missing or do not fit `input_ids` ([B, T])."""
    given = {"images": images, "images_seq_mask": images_seq_mask, "images_spatial_crop": images_spatial_crop}
    for name, value in given.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (as the processor returns it), got {type(value).__name__}")
    if images_seq_mask is None:
        if images is not None or images_spatial_crop is not None:
            raise ValueError("images need images_seq_mask (where their vectors go) and images_spatial_crop; pass "
                             "all three from the processor's output")
        return False
    B, T = ids_shape
    if tuple(images_seq_mask.shape) != (B, T):
        raise ValueError(f"images_seq_mask has shape {tuple(images_seq_mask.shape)}; expected {(B, T)} like input_ids")
    missing = [name for name in ("images", "images_spatial_crop") if given[name] is None]
    if missing:
        if bool(images_seq_mask.any()):
            raise ValueError(f"images_seq_mask marks image positions but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} None")
        return False
    if images.dim() != 5 or images.shape[0] != B:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected [{B}, tiles, 3, height, width]")
    if images_spatial_crop.dim() != 3 or images_spatial_crop.shape[0] != B or images_spatial_crop.shape[2] != 2:
        raise ValueError(f"images_spatial_crop has shape {tuple(images_spatial_crop.shape)}; expected [{B}, images, 2]")
    if bool((images_spatial_crop < 0).any()):
        raise ValueError("images_spatial_crop holds a negative tile count")
    return True


def check_legacy_cache(past_key_values, config) -> None:
    """The reference's cache format: one (tensor, tensor) pair per layer, the sequence on dim 2,
    (k_pe [B, 1, L, rope dim], c_kv [B, 1, L, kv_lora_rank]) for MLA, (keys, values) [B, heads, L,
    head_dim] for MHA."""
    expected = (f"a KVCache or one (k_pe [B, 1, L, {config.qk_rope_head_dim}], c_kv [B, 1, L, "
                f"{config.kv_lora_rank}]) pair per layer" if config.use_mla else
                f"a KVCache or one (keys, values) pair of [B, {config.num_key_value_heads}, L, "
                f"{config.hidden_size // config.num_attention_heads}] tensors per layer")
    if not isinstance(past_key_values, (list, tuple)):
        raise TypeError(f"past_key_values must be {expected}, got {type(past_key_values).__name__}")
    if len(past_key_values) != config.num_hidden_layers:
        raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has "
                         f"{config.num_hidden_layers}; expected {expected}")
    first = None
    for index, layer in enumerate(past_key_values):
        if not (isinstance(layer, (list, tuple)) and len(layer) == 2
                and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in layer)):
            raise TypeError(f"past_key_values[{index}] must be a pair of 4-D tensors; expected {expected}")
        first = first if first is not None else layer[0]
        if not config.use_mla:
            shape = (first.shape[0], config.num_key_value_heads, first.shape[2],
                     config.hidden_size // config.num_attention_heads)
            if any(tuple(t.shape) != shape for t in layer):
                raise ValueError(f"past_key_values[{index}] has shapes {tuple(layer[0].shape)}, "
                                 f"{tuple(layer[1].shape)}; expected {expected} (here {shape})")
