"""Turning next-token logits into the next token, with the semantics of transformers' generate
(the reference's generation path): repetition penalty, min_new_tokens, then for sampling
temperature, top-k and top-p, then argmax or a multinomial draw."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class SamplingSettings:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default; applies only when sampling
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] = ()
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {self.temperature}; "
                                 f"use do_sample=False for greedy decoding")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def process_logits(scores: torch.Tensor, history: Optional[torch.Tensor], generated: int,
                   settings: SamplingSettings) -> torch.Tensor:
    """float32 [B, V] logits -> the scores that decide the next token (transformers' order)."""
    if settings.repetition_penalty != 1.0 and history is not None and history.shape[1]:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * settings.repetition_penalty, seen / settings.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if generated < settings.min_new_tokens and settings.eos_token_ids:
        eos = torch.tensor(settings.eos_token_ids, device=scores.device)
        scores = scores.index_fill(1, eos, -float("inf"))
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if settings.top_k:
        k = min(settings.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - settings.top_p
        drop_sorted[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -float("inf"))
    return scores


def choose_next(scores: torch.Tensor, do_sample: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
