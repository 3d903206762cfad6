"""Generation: `generate` and `incremental_prefilling`, owned by this library rather than borrowed
from transformers, so they work the same on transformers 4.5x and 5.x (spec:
generation_and_prefill.md §2-§3).

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

from .devices import on_model_device
from .fast_decode import decoder_for
from .kv_cache import KVCache
from .outputs import GenerateOutput
from .input_checks import check_input_ids, check_inputs_embeds
from .sampling import SamplingSettings, as_int, choose_next, process_logits, unusable_rows

SYNC_EVERY = 8  # decode steps between host reads of "is any row still generating"
PREFILL_CHUNK_TOKENS = 16384  # prompt tokens (batch x length) per prefill forward
UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "assistant_model": None}
IGNORED = ("output_attentions", "output_hidden_states", "synced_gpus", "position_ids", "cache_position",
           "num_logits_to_keep", "logits_to_keep", "return_legacy_cache", "tokenizer")


class GenerationMixin:
    """`generate` / `incremental_prefilling` for DeepseekV2ForCausalLM and DeepseekVLV2ForCausalLM."""

    def _decoder(self):
        return getattr(self, "language", self)

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
        attention_mask=None and one-token prompts, and uses padding-aware positions (P-GEN-2/3)."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with images) or inputs_embeds")
            inputs_embeds = self._embed(input_ids, images, images_seq_mask, images_spatial_crop)
        lm = self._decoder()
        check_inputs_embeds(inputs_embeds, lm.config.hidden_size)
        B, T, _ = inputs_embeds.shape
        attention_mask = _mask_or_ones(attention_mask, B, T, inputs_embeds.device)
        positions = padding_aware_positions(attention_mask)
        cache = KVCache(lm.config, B, T, lm.cache_devices(inputs_embeds.device), inputs_embeds.dtype)
        for start in range(0, T - 1, chunk_size):
            end = min(start + chunk_size, T - 1)
            lm(inputs_embeds=inputs_embeds[:, start:end], attention_mask=attention_mask[:, :end],
               position_ids=positions[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return inputs_embeds, cache

    @on_model_device
    @torch.inference_mode()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, images=None, images_seq_mask=None,
                 images_spatial_crop=None, past_key_values=None, max_new_tokens=None, max_length=None,
                 min_new_tokens=0, do_sample=False, temperature=1.0, top_p=1.0, top_k=50,
                 repetition_penalty=1.0, pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=True,
                 streamer=None, stopping_criteria=None, logits_processor=None, return_dict_in_generate=False,
                 output_scores=False, output_logits=False, generation_config=None, generator=None, **kwargs):
        """Greedy or sampled generation with the arguments transformers' generate takes (see the
        module docstring for what is returned). `generator` (a torch.Generator) makes sampling
        reproducible per call.

        Bad arguments raise before any compute, naming the argument: `max_new_tokens` must be
        >= 1 (0 is refused, as transformers' GenerationConfig does; there is no "prompt only"
        result), `max_length` must leave room for one new token, token ids (`input_ids`,
        `eos_token_id`, `pad_token_id`) must lie in the vocabulary (`eos_token_id=[]` turns EOS
        stopping off), and the sampling settings must be finite numbers in range (sampling.py).
        Should the model produce scores from which no token can be chosen (NaN logits), a
        ValueError names the step and batch rows."""
        for name, allowed in UNSUPPORTED.items():
            if name in kwargs and kwargs.pop(name) != allowed:
                raise NotImplementedError(f"{name} is not supported by this generate (only {name}={allowed})")
        for name in IGNORED:
            kwargs.pop(name, None)
        if generation_config is not None:
            defaults = generation_config.to_dict()
            max_new_tokens = max_new_tokens if max_new_tokens is not None else defaults.get("max_new_tokens")
            eos_token_id = eos_token_id if eos_token_id is not None else defaults.get("eos_token_id")
            pad_token_id = pad_token_id if pad_token_id is not None else defaults.get("pad_token_id")
        if kwargs:
            raise TypeError(f"generate() got unexpected arguments: {sorted(kwargs)}")
        if not use_cache:
            raise ValueError("use_cache=False is not supported: generation always uses the KV cache")
        _check_hooks(streamer, stopping_criteria, logits_processor, generator)

        lm = self._decoder()
        vocab_size = lm.get_input_embeddings().num_embeddings
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("generate needs input_ids or inputs_embeds")
            inputs_embeds = self._embed(input_ids, images, images_seq_mask, images_spatial_crop)
        elif input_ids is not None:
            check_input_ids(input_ids, vocab_size)
        check_inputs_embeds(inputs_embeds, lm.config.hidden_size)
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if input_ids is not None and tuple(input_ids.shape) != (B, T):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                             f"disagree on batch size or length")
        eos = _token_ids("eos_token_id", eos_token_id if eos_token_id is not None else lm.config.eos_token_id,
                         vocab_size)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        _token_ids("pad_token_id", pad_token_id, vocab_size)
        if max_new_tokens is None and max_length is not None:
            prompt_tokens = T if input_ids is not None else 0
            max_new_tokens = as_int("max_length", max_length) - prompt_tokens
            if max_new_tokens < 1:
                raise ValueError(f"max_length={max_length} leaves no room for new tokens after the {prompt_tokens}-"
                                 f"token prompt; pass max_new_tokens, or a max_length above {prompt_tokens}")
        settings = SamplingSettings(
            max_new_tokens=20 if max_new_tokens is None else max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=top_k,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            eos_token_ids=tuple(eos), pad_token_id=pad_token_id,
        )
        limit = lm.config.max_position_embeddings
        if T + settings.max_new_tokens > limit:
            raise ValueError(f"the prompt has {T} tokens and max_new_tokens={settings.max_new_tokens}, together more "
                             f"than the model's context of {limit}; ask for at most {max(limit - T, 0)} new tokens")

        attention_mask = _mask_or_ones(attention_mask, B, T, device)
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
            logits = lm(inputs_embeds=inputs_embeds[:, start:end], attention_mask=full_mask[:, :end],
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
        greedy_on_device = (decoder is not None and not do_sample and settings.repetition_penalty == 1.0
                            and logits_processor is None and not output_scores and not output_logits)
        if greedy_on_device:
            generated = _greedy_on_device(decoder, logits, next_positions, T, sequence, prompt_len, settings,
                                          streamer, stopping_criteria)
            scores_out, logits_out = [], []
        else:
            generated, scores_out, logits_out = _decode_on_host(
                step, logits, next_positions, T, sequence, prompt_len, settings, do_sample, generator, streamer,
                stopping_criteria, logits_processor, output_scores, output_logits)
        if streamer is not None:
            streamer.end()

        sequences = sequence[:, : prompt_len + generated]
        if not return_dict_in_generate:
            return sequences
        if decoder is not None:  # the static cache is reused by the next call: hand out a copy
            cache = KVCache.from_legacy(tuple(cache), lm.config)
        return GenerateOutput(sequences=sequences, scores=tuple(scores_out) if output_scores else None,
                              logits=tuple(logits_out) if output_logits else None, past_key_values=cache)


def static_decoder(lm, batch_size: int, settings: SamplingSettings, device: torch.device):
    """The GPU fast path's StaticDecoder for this call (fast_decode.py): on CUDA unless the model's
    `cuda_graphs` is off, and when there is more than one token to make; not for a model spread over
    several devices (its graphs would span GPUs): that one decodes with plain kernels."""
    if device.type != "cuda" or not lm.cuda_graphs or settings.max_new_tokens < 2 or lm.is_split:
        return None
    return decoder_for(lm, batch_size, compile_after=lm.compile_decode_after)


def _decode_on_host(step, logits, positions, T, sequence, prompt_len, settings, do_sample, generator, streamer,
                    criteria, processors, output_scores, output_logits):
    """The general decode loop: logits processing, sampling and stopping run on the host side, one
    `step` (eager or a CUDA-graph replay) per token. Fills `sequence` after `prompt_len`; returns
    the number of new tokens and the per-step scores / logits asked for."""
    B, device = sequence.shape[0], sequence.device
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(settings.eos_token_ids, device=device) if settings.eos_token_ids else None
    scores_out, logits_out = [], []
    # Whether any row is still going after each step, kept on the device: reading it costs a host
    # synchronisation, so it is read every SYNC_EVERY steps (every step when streaming) and the CPU
    # meanwhile queues the next steps. Steps past the end are cut off below. `unusable` (the rows
    # whose scores allow no choice, e.g. NaN logits) is read at the same times and raises.
    alive, unusable = [], []
    checked = 0  # steps whose `unusable` flags have been read
    sync_every = 1 if streamer is not None else SYNC_EVERY
    generated = 0
    while True:
        history = sequence[:, : prompt_len + generated]
        scores = process_logits(logits, history, generated, settings)
        for processor in processors or ():
            scores = processor(history, scores)
        if output_scores:
            scores_out.append(scores)
        if output_logits:
            logits_out.append(logits)
        unusable.append(unusable_rows(scores, do_sample) & unfinished)
        tokens = torch.where(unfinished, choose_next(scores, do_sample, generator), settings.pad_token_id)
        sequence[:, prompt_len + generated] = tokens
        generated += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if eos_tensor is not None:
            unfinished &= ~torch.isin(tokens, eos_tensor)
        if criteria is not None:
            unfinished &= ~_stop_flags(criteria, sequence[:, : prompt_len + generated], scores, B, device)
        alive.append(unfinished.any())
        if generated == settings.max_new_tokens:
            break
        if generated % sync_every == 0:
            _raise_if_unusable(unusable, checked)
            checked = generated
            if not all(torch.stack(alive[-sync_every:]).tolist()):
                break
        logits = step(tokens, positions, T + generated - 1)
        positions = positions + 1
    _raise_if_unusable(unusable, checked)
    flags = torch.stack(alive).tolist()
    if False in flags:  # generation ended when no row was left going
        generated = flags.index(False) + 1
    return generated, scores_out[:generated], logits_out[:generated]


def _raise_if_unusable(unusable, first_step) -> None:
    """ValueError naming the first step (from `first_step` on) and its batch rows whose scores allowed
    no choice of token."""
    if first_step >= len(unusable):
        return
    flags = torch.stack(unusable[first_step:])
    if not bool(flags.any()):
        return
    step = first_step + int(flags.any(dim=1).nonzero()[0])
    rows = unusable[step].nonzero().flatten().tolist()
    raise ValueError(f"generation step {step}: the scores of batch rows {rows} hold NaN or inf, or mask every "
                     "token, so no next token can be chosen. The logits were not finite (NaN in inputs_embeds or "
                     "images? float16 overflow? try bfloat16 or float32) or a logits_processor set every score "
                     "to -inf")


def _greedy_on_device(decoder, logits, positions, T, sequence, prompt_len, settings, streamer, criteria) -> int:
    """Greedy decoding with the token choice inside the decoder's CUDA graphs. Fills `sequence`
    after `prompt_len` and returns the number of new tokens."""
    B = sequence.shape[0]
    first = choose_next(process_logits(logits, None, 0, settings), do_sample=False)
    decoder.start_greedy(first, positions, T, torch.ones_like(first, dtype=torch.bool), settings.eos_token_ids,
                         settings.pad_token_id, settings.min_new_tokens)
    per_step_host = streamer is not None or criteria is not None
    generated = 0
    while True:
        generated += 1
        if per_step_host:
            tokens = decoder.chosen[:, generated - 1]
            if streamer is not None:
                streamer.put(tokens.cpu())
            if criteria is not None:
                history = torch.cat((sequence[:, :prompt_len], decoder.chosen[:, :generated]), dim=1)
                decoder.unfinished &= ~_stop_flags(criteria, history, None, B, sequence.device)
                decoder.alive[generated - 1] = decoder.unfinished.any()
        if generated == settings.max_new_tokens:
            break
        if (per_step_host or generated % SYNC_EVERY == 0) and not bool(decoder.alive[generated - 1]):
            break
        decoder.greedy_step(T + generated - 1)
    alive = decoder.alive[:generated].tolist()
    if False in alive:
        generated = alive.index(False) + 1
    sequence[:, prompt_len : prompt_len + generated] = decoder.chosen[:, :generated]
    return generated


def eager_step(lm, attention_mask, cache):
    """A decode step through the model's ordinary forward: tokens [B] -> next logits [B, V]."""
    embed = lm.get_input_embeddings()

    def step(tokens, positions, slot):
        out = lm(inputs_embeds=embed(tokens[:, None]), attention_mask=attention_mask[:, : slot + 1],
                 position_ids=positions[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    return step


def padding_aware_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: cumsum(mask) - 1, padding set to 1 (as transformers)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _mask_or_ones(attention_mask, B, T, device):
    """The [B, T] bool prompt mask (all ones when None); every row must keep at least one token."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of shape {(B, T)}, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all zeros: every batch row needs at least one prompt token")
    return mask


def _token_ids(name, ids, vocab_size) -> list:
    """`ids` (None, an int, a list or a tensor of ints) as a list of ids in [0, vocab_size)."""
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    ids = [as_int(name, i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"{name} {outside[0] if len(outside) == 1 else outside} is outside the vocabulary "
                         f"[0, {vocab_size})"
                         + ("; pass eos_token_id=[] to generate without stopping at EOS" if name == "eos_token_id"
                            else ""))
    return ids


def _check_hooks(streamer, stopping_criteria, logits_processor, generator) -> None:
    """TypeError naming the argument when a hook has the wrong type."""
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise TypeError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    for name, hooks in (("stopping_criteria", stopping_criteria), ("logits_processor", logits_processor)):
        if hooks is None:
            continue
        if not isinstance(hooks, (list, tuple)):
            raise TypeError(f"{name} must be a list of callables, got {type(hooks).__name__}")
        for index, hook in enumerate(hooks):
            if not callable(hook):
                raise TypeError(f"{name}[{index}] is a {type(hook).__name__}, not a callable")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _stop_flags(criteria, history, scores, B, device) -> torch.Tensor:
    """Per-row stop flags from transformers-style criteria (returning a bool or a [B] bool tensor)."""
    flags = torch.zeros(B, dtype=torch.bool, device=device)
    for criterion in criteria:
        result = criterion(history, scores)
        if isinstance(result, torch.Tensor):
            flags |= result.to(device=device, dtype=torch.bool).reshape(-1).expand(B)
        elif result:
            flags[:] = True
    return flags
