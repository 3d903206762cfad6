"""The decode loops of `generate`: one step per token with logits processing, sampling and stopping
on the host side (`decode_on_host`), or greedy decoding with the token choice inside the CUDA-graph
runner (`greedy_on_device`). Both read "is any row still going" from the device only every
SYNC_EVERY steps (every step when streaming or stopping per step).
"""
import torch

from .sampling import choose_next, process_logits, unusable_rows

SYNC_EVERY = 8  # decode steps between host reads of "is any row still generating"


def decode_on_host(step, logits, positions, T, sequence, prompt_len, settings, generator, streamer, criteria,
                   processors, output_scores, output_logits):
    """The general decode loop: logits processing, sampling and stopping run on the host side, one
    `step` (eager or a CUDA-graph replay) per token. Fills `sequence` after `prompt_len`; returns
    the number of new tokens and the per-step scores / logits asked for."""
    B, device, do_sample = sequence.shape[0], sequence.device, settings.do_sample
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
            unfinished &= ~stop_flags(criteria, sequence[:, : prompt_len + generated], scores, B, device)
        alive.append(unfinished.any())
        if generated == settings.max_new_tokens:
            break
        if generated % sync_every == 0:
            raise_if_unusable(unusable, checked)
            checked = generated
            if not all(torch.stack(alive[-sync_every:]).tolist()):
                break
        logits = step(tokens, positions, T + generated - 1)
        positions = positions + 1
    raise_if_unusable(unusable, checked)
    flags = torch.stack(alive).tolist()
    if False in flags:  # generation ended when no row was left going
        generated = flags.index(False) + 1
    return generated, scores_out[:generated], logits_out[:generated]


def raise_if_unusable(unusable, first_step) -> None:
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


def greedy_on_device(decoder, logits, positions, T, sequence, prompt_len, settings, streamer, criteria) -> int:
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
                decoder.unfinished &= ~stop_flags(criteria, history, None, B, sequence.device)
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



def stop_flags(criteria, history, scores, B, device) -> torch.Tensor:
    """Per-row stop flags from transformers-style criteria (returning a bool or a [B] bool tensor)."""
    flags = torch.zeros(B, dtype=torch.bool, device=device)
    for criterion in criteria:
        result = criterion(history, scores)
        if isinstance(result, torch.Tensor):
            flags |= result.to(device=device, dtype=torch.bool).reshape(-1).expand(B)
        elif result:
            flags[:] = True
    return flags
