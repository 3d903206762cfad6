"""Generation: `generate` and `incremental_prefilling`, owned by this library rather than borrowed
from transformers, so they work the same on transformers 4.5x and 5.x
(docs/deviations.md#generate-is-implemented-here).

    generate(...)
      prompt embeddings (images merged)      prepare_inputs_embeds, or the given inputs_embeds
      prefill what the cache does not hold   one forward, logits for the last row only
      loop: process logits -> next token -> stream / stop -> one-token forward (eager, or a
            replayed CUDA graph on the GPU fast path)

What it returns follows the reference's recipes: with `input_ids` given, the prompt ids followed
by the new tokens; with only `inputs_embeds`, the new tokens only. `return_dict_in_generate`
gives an object with `.sequences` and `.scores` (one [B, vocab] tensor per step).
"""
import torch

from ..kernels import dispatch
from ..modeling.devices import on_model_device
from ..modeling.input_checks import check_input_ids, check_inputs_embeds
from ..modeling.kv_cache import KVCache
from ..modeling.outputs import GenerateOutput
from .cuda_graphs import decoder_for
from .decode_loop import decode_on_host, eager_step, greedy_on_device
from .sampling import SamplingSettings
from .settings import GenerateSettings, check_hooks

PREFILL_CHUNK_TOKENS = 16384  # prompt tokens (batch x length) per prefill forward


class GenerationMixin:
    """`generate` / `incremental_prefilling` for DeepseekV2ForCausalLM and DeepseekVLV2ForCausalLM."""

    def _decoder(self):
        return getattr(self, "language", self)

    def _prompt_shape(self, input_ids, inputs_embeds):
        """(batch, length, device) of the prompt, from the checked `inputs_embeds` if given (with
        `input_ids`, if also given, checked against them), else from the shape of `input_ids` (their
        values are checked when they are embedded) and the device of the embeddings. Nothing is
        embedded yet: the prompt mask is read before the vision tower is queued (`prompt_mask`)."""
        lm = self._decoder()
        embedding = lm.get_input_embeddings()
        if inputs_embeds is None:
            if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2):
                check_input_ids(input_ids, embedding.num_embeddings)  # raises, naming what is wrong
            return input_ids.shape[0], input_ids.shape[1], embedding.weight.device
        check_inputs_embeds(inputs_embeds, lm.config.hidden_size)
        B, T, _ = inputs_embeds.shape
        if input_ids is not None:
            check_input_ids(input_ids, embedding.num_embeddings)
            if tuple(input_ids.shape) != (B, T):
                raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                                 f"disagree on batch size or length")
        return B, T, inputs_embeds.device

    def _embed(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None):
        """Prompt embeddings (images merged); checks input_ids (and the image inputs)."""
        if hasattr(self, "prepare_inputs_embeds"):
            return self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        embedding = self.get_input_embeddings()
        check_input_ids(input_ids, embedding.num_embeddings)
        return embedding(input_ids)

    @on_model_device
    @torch.inference_mode()
    def incremental_prefilling(self, input_ids=None, attention_mask=None, inputs_embeds=None, images=None,
                               images_seq_mask=None, images_spatial_crop=None, chunk_size: int = 1024):
        """Prefill all prompt tokens but the last in chunks of `chunk_size`; return
        `(inputs_embeds, cache)` for `generate(inputs_embeds=..., input_ids=..., past_key_values=cache)`.

        Activation memory is bounded by the chunk. Unlike the reference, this accepts
        attention_mask=None and one-token prompts, and uses padding-aware positions
        (docs/deviations.md#incremental_prefilling-positions-skip-left-padding)."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        lm = self._decoder()
        if inputs_embeds is None and input_ids is None:
            raise ValueError("pass input_ids (with images) or inputs_embeds")
        B, T, device = self._prompt_shape(input_ids if inputs_embeds is None else None, inputs_embeds)
        attention_mask, padded = prompt_mask(attention_mask, B, T, device)
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, images, images_seq_mask, images_spatial_crop)
        positions = padding_aware_positions(attention_mask)
        cache = KVCache(lm.config, B, T, lm.cache_devices(device), inputs_embeds.dtype)
        for start in range(0, T - 1, chunk_size):
            end = min(start + chunk_size, T - 1)
            lm(inputs_embeds=inputs_embeds[:, start:end], attention_mask=attention_mask[:, :end] if padded else None,
               position_ids=positions[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return inputs_embeds, cache

    @on_model_device
    @torch.inference_mode()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, images=None, images_seq_mask=None,
                 images_spatial_crop=None, past_key_values=None, streamer=None, stopping_criteria=None,
                 logits_processor=None, generator=None, generation_config=None, **settings):
        """Greedy or sampled generation with the arguments transformers' generate takes (see the
        module docstring for what is returned): the prompt (ids and / or embeddings, images, mask, a
        prefilled cache), the hooks (`streamer`, `stopping_criteria`, `logits_processor`, and
        `generator`, a torch.Generator that makes sampling reproducible per call), and the settings
        as keyword arguments (max_new_tokens, do_sample, temperature, eos_token_id, ...: see
        GenerateSettings in settings.py; an unknown name is a TypeError).

        Bad arguments raise before any compute, naming the argument: `max_new_tokens` must be
        >= 1 (0 is refused, as transformers' GenerationConfig does; there is no "prompt only"
        result), `max_length` must leave room for one new token, token ids (`input_ids`,
        `eos_token_id`, `pad_token_id`) must lie in the vocabulary (`eos_token_id=[]` turns EOS
        stopping off), and the sampling settings must be finite numbers in range (sampling.py).
        Should the model produce scores from which no token can be chosen (NaN logits), a
        ValueError names the step and batch rows."""
        options = GenerateSettings.from_kwargs(settings, generation_config)
        check_hooks(streamer, stopping_criteria, logits_processor, generator)

        lm = self._decoder()
        vocab_size = lm.get_input_embeddings().num_embeddings
        if inputs_embeds is None and input_ids is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        B, T, device = self._prompt_shape(input_ids, inputs_embeds)
        settings = options.sampling(T if input_ids is not None else 0, lm.config.eos_token_id, vocab_size)
        limit = lm.config.max_position_embeddings
        if T + settings.max_new_tokens > limit:
            raise ValueError(f"the prompt has {T} tokens and max_new_tokens={settings.max_new_tokens}, together more "
                             f"than the model's context of {limit}; ask for at most {max(limit - T, 0)} new tokens")
        attention_mask, padded = prompt_mask(attention_mask, B, T, device)
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, images, images_seq_mask, images_spatial_crop)

        full_mask = torch.cat((attention_mask, attention_mask.new_ones(B, settings.max_new_tokens)), dim=1)
        positions = padding_aware_positions(attention_mask)
        given = None
        if past_key_values is not None:
            given = lm.prepare_cache(past_key_values, B, T + settings.max_new_tokens, inputs_embeds)
        decoder = static_decoder(lm, B, settings, device)
        if decoder is not None:
            cache = decoder.start(full_mask, given)
        else:
            cache = given if given is not None else KVCache(lm.config, B, T + settings.max_new_tokens,
                                                            lm.cache_devices(device), inputs_embeds.dtype)
        past = cache.length
        if past >= T:
            raise ValueError(f"past_key_values already holds {past} tokens of this {T}-token prompt: nothing is left "
                             f"to feed (incremental_prefilling keeps the last prompt token out of the cache)")
        chunk = max(PREFILL_CHUNK_TOKENS // B, 1)  # bounds prefill activations for big batches
        for start in range(past, T, chunk):
            end = min(start + chunk, T)
            logits = lm(inputs_embeds=inputs_embeds[:, start:end], attention_mask=full_mask[:, :end] if padded else None,
                        position_ids=positions[:, start:end], past_key_values=cache, use_cache=True,
                        logits_to_keep=1).logits[:, -1]
        step = decoder.step if decoder is not None else eager_step(lm, full_mask, cache)

        # the prompt ids (if given) then the new tokens; the repetition penalty and stopping
        # criteria see this history, as transformers' generate does
        prompt_len = T if input_ids is not None else 0
        sequence = torch.empty(B, prompt_len + settings.max_new_tokens, dtype=torch.long, device=device)
        if input_ids is not None:
            sequence[:, :T] = input_ids
        if streamer is not None:
            streamer.put(sequence[:, :prompt_len].cpu())
        next_positions = positions[:, -1] + 1
        output_scores, output_logits = options.output_scores, options.output_logits
        if (decoder is not None and not settings.do_sample and settings.repetition_penalty == 1.0
                and logits_processor is None and not output_scores and not output_logits):
            generated = greedy_on_device(decoder, logits, next_positions, T, sequence, prompt_len, settings,
                                         streamer, stopping_criteria)
            scores_out, logits_out = [], []
        else:
            generated, scores_out, logits_out = decode_on_host(
                step, logits, next_positions, T, sequence, prompt_len, settings, generator, streamer,
                stopping_criteria, logits_processor, output_scores, output_logits)
        if streamer is not None:
            streamer.end()

        sequences = sequence[:, : prompt_len + generated]
        if not options.return_dict_in_generate:
            return sequences
        if decoder is not None:  # the static cache is reused by the next call: hand out a copy
            cache = KVCache.from_legacy(tuple(cache), lm.config)
        return GenerateOutput(sequences=sequences, scores=tuple(scores_out) if output_scores else None,
                              logits=tuple(logits_out) if output_logits else None, past_key_values=cache)


def static_decoder(lm, batch_size: int, settings: SamplingSettings, device: torch.device):
    """The GPU fast path's StaticDecoder for this call (cuda_graphs.py): on CUDA unless the model's
    `cuda_graphs` is off, and when there is more than one token to make; not for a model spread over
    several devices (its graphs would span GPUs) or whose decode step reads back to the host
    (float32 on CUDA): those decode with plain kernels."""
    if device.type != "cuda" or not lm.cuda_graphs or settings.max_new_tokens < 2 or lm.is_split:
        return None
    if not dispatch.decode_is_capturable(device, lm.dtype):
        return None
    return decoder_for(lm, batch_size, compile_after=lm.compile_decode_after)


def padding_aware_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: cumsum(mask) - 1, padding set to 1 (as transformers)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def prompt_mask(attention_mask, B, T, device):
    """(the [B, T] bool prompt mask on `device`, all ones when None; whether it pads any row). Every
    row must keep at least one token. A mask given on the device is read back once, here: generate
    calls this before it queues the vision tower, so the read waits for no model work, and a prefill
    without padding then runs with no mask at all (plain causal attention; nothing in the decoder
    reads the device, so the host queues the prefill while the tower runs)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device), False
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of shape {(B, T)}, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
    mask = attention_mask.to(dtype=torch.bool)
    kept = mask.sum(dim=1).tolist()  # on the host for a host mask, else the one read back
    empty = [b for b, count in enumerate(kept) if count == 0]
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all zeros: every batch row needs at least one prompt token")
    return mask.to(device), any(count < T for count in kept)
