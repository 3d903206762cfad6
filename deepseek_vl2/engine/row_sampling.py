"""Per-request token choice for the continuous-batching engine: each row of a decode batch has its own
sampling settings, history (prompt ids + generated ids, for the repetition penalty) and generator.

A row is handled exactly as `generate` handles a batch of one with the same settings (the settings
are built by generate's own `GenerateSettings`, the scores by sampling.py's `process_logits`, the
token by `choose_next` with the row's generator), so a greedy or seeded request gives what
`ChatEngine.chat` gives for it alone: one multinomial draw per step from a [1, vocab] row, the same
consumption of the generator as generate's loop.
"""
from typing import Optional

import torch

from ..generation.sampling import choose_next, process_logits, unusable_rows
from ..generation.settings import GenerateSettings
from .params import GenerationParams


class RowSampler:
    """The settings, history and generator of one request; `choose` picks its next token."""

    def __init__(self, params: GenerationParams, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int,
                 vocab_size: int, device: torch.device):
        T = prompt_ids.shape[-1]
        # what ChatEngine.chat_batch hands to generate for one row
        options = GenerateSettings(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id,
                                   **params.sampling_options())
        self.settings = options.sampling(T, eos_id, vocab_size)
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.prompt_len = T
        self.history = torch.empty(1, T + max_new_tokens, dtype=torch.long, device=device)
        self.history[0, :T] = prompt_ids.reshape(-1).to(device)
        self.generated = 0

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    def choose(self, logits: torch.Tensor):
        """`logits` [1, vocab] (float32) -> (token [1], unusable [1] bool), both on the device; the token
        enters the history. Nothing is read back to the host here."""
        seen = self.history[:, : self.prompt_len + self.generated]
        scores = process_logits(logits, seen, self.generated, self.settings)
        unusable = unusable_rows(scores, self.settings.do_sample)
        token = choose_next(scores, self.settings.do_sample, self.generator)
        self.history[0, self.prompt_len + self.generated] = token[0]
        self.generated += 1
        return token, unusable
