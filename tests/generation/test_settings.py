"""generate's keyword settings: transformers' names routed to GenerateSettings, ignored and
single-valued names, unknown names refused, generation_config defaults, max_length arithmetic."""
import pytest
from transformers import GenerationConfig

from deepseek_vl2.generation.settings import GenerateSettings, check_hooks


def test_transformers_style_kwargs_are_accepted():
    s = GenerateSettings.from_kwargs(dict(max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                                          repetition_penalty=1.1, pad_token_id=1, eos_token_id=[1, 2],
                                          bos_token_id=0, use_cache=True, num_beams=1, output_attentions=False,
                                          return_dict_in_generate=True, output_scores=True))
    sampling = s.sampling(prompt_tokens=5, default_eos=9, vocab_size=10)
    assert (sampling.max_new_tokens, sampling.eos_token_ids, sampling.pad_token_id) == (7, (1, 2), 1)
    assert s.return_dict_in_generate and s.output_scores and not s.output_logits


def test_defaults_come_from_the_config_then_the_model():
    config = GenerationConfig(max_new_tokens=3, eos_token_id=4, pad_token_id=5)
    s = GenerateSettings.from_kwargs({}, config).sampling(0, default_eos=9, vocab_size=10)
    assert (s.max_new_tokens, s.eos_token_ids, s.pad_token_id) == (3, (4,), 5)
    s = GenerateSettings.from_kwargs({}).sampling(0, default_eos=9, vocab_size=10)
    assert (s.max_new_tokens, s.eos_token_ids, s.pad_token_id) == (20, (9,), 9)  # pad: the first EOS


def test_max_length_counts_the_prompt():
    assert GenerateSettings(max_length=12).sampling(5, None, 10).max_new_tokens == 7
    with pytest.raises(ValueError, match="max_length=5 leaves no room for new tokens after the 5-token prompt"):
        GenerateSettings(max_length=5).sampling(5, None, 10)


@pytest.mark.parametrize("kw, error, message", [
    (dict(frobnicate=1), TypeError, r"unexpected arguments: \['frobnicate'\]"),
    (dict(num_beams=2), NotImplementedError, "num_beams"),
    (dict(use_cache=False), ValueError, "use_cache=False is not supported"),
])
def test_refused_arguments(kw, error, message):
    with pytest.raises(error, match=message):
        GenerateSettings.from_kwargs(kw)


def test_token_ids_and_hooks_are_checked():
    with pytest.raises(ValueError, match=r"eos_token_id 12 is outside the vocabulary \[0, 10\)"):
        GenerateSettings(eos_token_id=12).sampling(0, None, 10)
    with pytest.raises(TypeError, match="stopping_criteria must be a list"):
        check_hooks(None, lambda ids, scores: True, None, None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        check_hooks(None, None, None, 3)


def test_a_generation_config_dict_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig, got dict"):
        GenerateSettings.from_kwargs({}, {"max_new_tokens": 3})


@pytest.mark.parametrize("name", ["use_cache", "do_sample", "output_scores", "return_dict_in_generate"])
def test_none_switches_take_their_default(name):
    settings = GenerateSettings.from_kwargs({name: None})
    assert getattr(settings, name) is getattr(GenerateSettings(), name)


@pytest.mark.parametrize("name, value", [("do_sample", "False"), ("do_sample", 1), ("use_cache", "yes"),
                                         ("output_scores", "True")])
def test_switches_that_are_not_bools_are_refused(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {type(value).__name__} {value!r}"):
        GenerateSettings.from_kwargs({name: value})


def test_numpy_bools_are_switches():
    import numpy as np

    settings = GenerateSettings.from_kwargs({"do_sample": np.float64(0.5) > 0})
    assert settings.do_sample is True
