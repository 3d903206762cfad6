"""Turning next-token logits into the next token, with the semantics of transformers' generate
(the reference's generation path): repetition penalty, min_new_tokens, then for sampling
temperature, top-k and top-p, then argmax or a multinomial draw.

Extreme settings never put NaN into the scores (on CUDA `torch.multinomial`
on NaN fires a device-side assert that breaks every later CUDA call of the process):

* `SamplingSettings` refuses what has no meaning up front, with a ValueError (or TypeError)
  naming the argument: NaN, infinite, zero or negative temperature (when sampling) and
  repetition_penalty, top_p outside (0, 1], negative top_k, max_new_tokens < 1.
* Finite but extreme values take their limit where float32 overflows. A tiny temperature
  (1e-39) divides the scores after subtracting each row's maximum, in float64, so it becomes
  greedy (uniform over exact ties) instead of inf / inf. A repetition penalty so small that a
  penalised score overflows to +inf (1e-300) keeps only the overflowed token(s) with the
  largest original score, as the exact computation would. Rows that do not overflow get
  exactly the values they got before.
* Scores that still cannot be sampled (NaN or inf logits from the model, or a logits
  processor that masks every token) are reported by `unusable_rows`; `choose_next` never
  hands them to `torch.multinomial`.
"""
import math
import operator
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence

import torch


def as_int(name: str, value) -> int:
    """`value` as a Python int (ints, numpy / torch integer scalars); TypeError naming `name` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def as_real(name: str, value) -> float:
    """`value` as a Python float; TypeError naming `name` for non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)) or (
            isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


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
        self.max_new_tokens = as_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:  # transformers' GenerationConfig refuses it the same way
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.min_new_tokens = as_int("min_new_tokens", self.min_new_tokens)
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        self.repetition_penalty = as_real("repetition_penalty", self.repetition_penalty)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: no penalty), got "
                             f"{self.repetition_penalty}")
        if self.do_sample:
            self.temperature = as_real("temperature", self.temperature)
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be > 0 when sampling (do_sample=True) and finite, got "
                                 f"{self.temperature}; use do_sample=False for greedy decoding")
            self.top_p = as_real("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k is not None:
                self.top_k = as_int("top_k", self.top_k)
                if self.top_k < 0:
                    raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def process_logits(scores: torch.Tensor, history: Optional[torch.Tensor], generated: int,
                   settings: SamplingSettings) -> torch.Tensor:
    """float32 [B, V] logits -> the scores that decide the next token (transformers' order)."""
    if settings.repetition_penalty != 1.0 and history is not None and history.shape[1]:
        scores = _penalise_repeats(scores, history, settings.repetition_penalty)
    if generated < settings.min_new_tokens and settings.eos_token_ids:
        eos = torch.tensor(settings.eos_token_ids, device=scores.device)
        scores = scores.index_fill(1, eos, -float("inf"))
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        scores = _divide_by_temperature(scores, settings.temperature)
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


def _penalise_repeats(scores, history, penalty: float):
    """transformers' repetition penalty: seen scores < 0 are multiplied by `penalty`, the others
    divided. With penalty < 1 a division can overflow float32 to +inf (and 0 / 0 would be NaN when
    the penalty underflows to 0 in float32): such a row keeps only its overflowed tokens with the
    largest original score (0 for them, -inf for the rest), the exact limit."""
    seen = scores.gather(1, history)
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    if penalty >= 1.0:
        return scores.scatter(1, history, penalised)
    penalised = torch.where(seen == 0, seen, penalised)
    out = scores.scatter(1, history, penalised)
    overflow = torch.isposinf(out) & torch.isfinite(scores)
    candidates = torch.where(overflow, scores, -float("inf"))
    winners = overflow & (candidates == candidates.amax(dim=-1, keepdim=True))
    limit = torch.zeros_like(out).masked_fill(~winners, -float("inf"))
    return torch.where(overflow.any(dim=-1, keepdim=True), limit, out)


def _divide_by_temperature(scores, temperature: float):
    """scores / temperature; rows where that overflows float32 (a tiny temperature) or divides by a
    temperature that float32 cannot hold get (scores - row max) / temperature computed in float64,
    which is the same distribution without inf - inf."""
    scaled = scores / temperature
    broken = (~torch.isfinite(scaled) & torch.isfinite(scores)) | torch.isnan(scaled)
    shifted = scores.double()
    shifted = ((shifted - shifted.amax(dim=-1, keepdim=True)) / temperature).to(scores.dtype)
    return torch.where(broken.any(dim=-1, keepdim=True), shifted, scaled)


def unusable_rows(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """[B] bool: rows from which no token can be chosen: a NaN score, every score -inf, or (when
    sampling, where softmax would give NaN) a +inf score."""
    bad = torch.isnan(scores).any(dim=-1) | torch.isneginf(scores).all(dim=-1)
    if do_sample:
        bad |= torch.isposinf(scores).any(dim=-1)
    return bad


def choose_next(scores: torch.Tensor, do_sample: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    # NaN / inf rows would make multinomial fail (on CUDA: a device-side assert). The caller raises
    # for them (unusable_rows); until then they are drawn from a uniform distribution.
    probs = torch.where(torch.isfinite(probs).all(dim=-1, keepdim=True), probs, 1.0)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
