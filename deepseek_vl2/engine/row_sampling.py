"""Token choice for the continuous-batching engine: each row of a decode batch has its own sampling
settings, history (prompt ids + generated ids, for the repetition penalty) and generator, and one
call (`choose_tokens`) picks the next token of every row.

Rows are handled exactly as `generate` handles a batch of one with the same settings: the settings
are built by generate's own `GenerateSettings`, the scores by sampling.py's `process_logits`, the
token by `choose_next`; a seeded row draws once per step from its own [1, vocab] row with its own
generator, the same consumption of the generator as generate's loop. So a greedy or seeded request
gives what `ChatEngine.chat` gives for it alone.

The work is batched by settings: the rows that share a `group_key` (all greedy rows, say) are scored
in one call; only seeded sampled rows draw one by one. Histories live in one buffer of a row per KV
slot (`Histories`), where what lies past a row's length is its first prompt token: a token it has
seen already, so a group can read its rows up to the longest one and the repetition penalty (a
gather and a scatter of the same values) comes out as for the row alone.

The chosen tokens stay on the device; `Chosen` copies them to the host without waiting, for the
engine to read one iteration later.
"""
from collections import defaultdict
from typing import List, Optional, Sequence

import torch

from ..generation.sampling import choose_next, process_logits, unusable_rows
from ..generation.settings import GenerateSettings
from .params import GenerationParams
from .slots import device_tensor


class RowSampler:
    """The settings and generator of one request, and how many tokens it has chosen."""

    def __init__(self, params: GenerationParams, prompt_len: int, max_new_tokens: int, eos_id: int,
                 vocab_size: int, device: torch.device):
        # what ChatEngine.generate_batch hands to generate for one row
        options = GenerateSettings(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id,
                                   **params.sampling_options())
        self.settings = options.sampling(prompt_len, eos_id, vocab_size)
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.prompt_len = prompt_len
        self.generated = 0

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    @property
    def seen(self) -> int:
        """Tokens in the row's history: the prompt and the tokens chosen so far."""
        return self.prompt_len + self.generated

    def group_key(self) -> tuple:
        """Rows with equal keys are scored together (process_logits takes one settings object)."""
        s = self.settings
        return (s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty, tuple(s.eos_token_ids),
                self.generated < s.min_new_tokens)


class Histories:
    """One history row per KV slot: [slots, capacity] token ids on the device."""

    def __init__(self, slots: int, capacity: int, device: torch.device):
        self.ids = torch.zeros(slots, capacity, dtype=torch.long, device=device)

    def start(self, slot: int, prompt_ids: torch.Tensor) -> None:
        prompt_ids = prompt_ids.reshape(-1).to(self.ids.device, non_blocking=True)
        self.ids[slot] = prompt_ids[0]
        self.ids[slot, : prompt_ids.shape[0]] = prompt_ids


def choose_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler], slots: torch.Tensor, histories: Histories):
    """`logits` [n, vocab] (float32), row i for `samplers[i]` in KV slot `slots[i]` (a long tensor on
    the device) -> (tokens [n], unusable [n] bool), both on the device. Each token enters its row's
    history and the row's count; nothing is read back to the host here."""
    n = len(samplers)
    device = logits.device
    tokens = torch.empty(n, dtype=torch.long, device=device)
    unusable = torch.empty(n, dtype=torch.bool, device=device)
    groups = defaultdict(list)
    for i, sampler in enumerate(samplers):
        groups[sampler.group_key()].append(i)
    for members in groups.values():
        index = None if len(members) == n else device_tensor(members, device)
        scores = logits if index is None else logits.index_select(0, index)
        first = samplers[members[0]]
        settings = first.settings
        seen = None
        if settings.repetition_penalty != 1.0:
            rows = histories.ids.index_select(0, slots if index is None else slots.index_select(0, index))
            seen = rows[:, : max(samplers[i].seen for i in members)]
        scores = process_logits(scores, seen, first.generated, settings)
        bad = unusable_rows(scores, settings.do_sample)
        chosen = _draw(scores, [samplers[i].generator for i in members], settings.do_sample)
        if index is None:
            tokens.copy_(chosen)
            unusable.copy_(bad)
        else:
            tokens.index_copy_(0, index, chosen)
            unusable.index_copy_(0, index, bad)
    # (a row that has ended may run one step more, see continuous.py: its write stays inside the row)
    last = histories.ids.shape[1] - 1
    histories.ids[slots, device_tensor([min(s.seen, last) for s in samplers], device)] = tokens
    for sampler in samplers:
        sampler.generated += 1
    return tokens, unusable


def _draw(scores: torch.Tensor, generators: List[Optional[torch.Generator]], do_sample: bool) -> torch.Tensor:
    """The token of each row: argmax, or a draw; a row with a generator draws alone with it (as a
    batch of one would), the others in one draw from the global generator."""
    if not do_sample or all(g is None for g in generators):
        return choose_next(scores, do_sample)
    chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        index = device_tensor(unseeded, scores.device)
        chosen.index_copy_(0, index, choose_next(scores.index_select(0, index), True))
    for i, generator in enumerate(generators):
        if generator is not None:
            chosen[i:i + 1] = choose_next(scores[i:i + 1], True, generator)
    return chosen


class Chosen:
    """Tokens chosen on the device for `requests` (row i for requests[i]), copied to the host without
    waiting; `values()` waits for that copy only, not for work launched after it."""

    def __init__(self, requests: list, tokens: torch.Tensor, unusable: torch.Tensor):
        self.requests = requests
        both = torch.stack([tokens, unusable.long()])
        self.ready = None
        if both.is_cuda:
            self.host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self.host.copy_(both, non_blocking=True)
            self.ready = torch.cuda.Event()
            # on the stream the copy runs on (its device's), not the calling thread's current device's:
            # the engine's thread of a model on cuda:1 has cuda:0 as its current device
            self.ready.record(torch.cuda.current_stream(both.device))
        else:
            self.host = both

    def values(self):
        """(request, token, unusable) for each row."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, unusable = self.host.tolist()
        return list(zip(self.requests, tokens, unusable))
