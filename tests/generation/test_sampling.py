"""Next-token choice against hand-computed values: repetition penalty, min_new_tokens, temperature,
top-k, top-p (transformers' order and semantics), greedy and seeded sampling."""
import math

import pytest
import torch

from deepseek_vl2.generation.sampling import SamplingSettings, choose_next, process_logits, unusable_rows

NEG = -float("inf")


def settings(**kw):
    return SamplingSettings(**kw)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_scores():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([[0, 1, 1]])  # repeats count once
    out = process_logits(scores, history, 0, settings(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert choose_next(out, do_sample=False).item() == 3


def test_min_new_tokens_masks_every_eos_until_reached():
    scores = torch.tensor([[1.0, 5.0, 2.0, 4.0]])
    s = settings(min_new_tokens=2, eos_token_ids=(1, 3))
    assert process_logits(scores, None, 1, s).tolist() == [[1.0, NEG, 2.0, NEG]]
    assert process_logits(scores, None, 2, s).tolist() == scores.tolist()


def test_temperature_then_top_k():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = process_logits(scores, None, 0, settings(do_sample=True, temperature=0.5, top_k=2, top_p=1.0))
    assert out.tolist() == [[NEG, 8.0, 6.0, NEG]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()
    # ascending cumulative: 0.05, 0.20, 0.50, 1.0; tokens whose cumulative <= 1 - 0.6 = 0.4 go
    out = process_logits(scores, None, 0, settings(do_sample=True, top_p=0.6, top_k=0))
    assert torch.isinf(out[0, 2:]).all() and torch.equal(out[0, :2], scores[0, :2])
    kept = out.softmax(-1)[0, :2]
    assert torch.allclose(kept, torch.tensor([0.5 / 0.8, 0.3 / 0.8]))


def test_greedy_settings_ignore_sampling_filters():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    out = process_logits(scores, None, 0, settings(do_sample=False, temperature=0.1, top_k=1, top_p=0.1))
    assert torch.equal(out, scores)


def test_sampling_draws_only_kept_tokens_and_repeats_with_a_seeded_generator():
    scores = torch.tensor([[0.0, math.log(3.0), NEG, NEG]])  # p = 1/4, 3/4
    draws = [choose_next(scores.expand(4000, -1), True, torch.Generator().manual_seed(0))]
    draws.append(choose_next(scores.expand(4000, -1), True, torch.Generator().manual_seed(0)))
    assert torch.equal(draws[0], draws[1]) and set(draws[0].tolist()) <= {0, 1}
    assert abs(draws[0].float().mean().item() - 0.75) < 0.03


def test_unusable_rows():
    scores = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [NEG, NEG], [float("inf"), 0.0]])
    assert unusable_rows(scores, do_sample=False).tolist() == [False, True, True, False]
    assert unusable_rows(scores, do_sample=True).tolist() == [False, True, True, True]


@pytest.mark.parametrize("kw, message", [
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=0.0), "top_p must be in"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_settings_refuse_meaningless_values(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kw)
