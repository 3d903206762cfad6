"""The settings `generate` takes as keyword arguments (transformers' names), checked in one place.

`GenerateSettings.from_kwargs` routes `generate(**kwargs)` here: every field below can be passed;
the arguments of transformers' generate that change nothing in this library are accepted and
ignored (IGNORED); those with a single meaning here raise for any other value (ONLY); any other
name is a TypeError naming it. A `generation_config` (a transformers GenerationConfig; a dict is
refused, as transformers' generate cannot use one either) fills max_new_tokens, eos_token_id and
pad_token_id when they are not passed. The switches (FLAGS) take True, False or None (their default).
"""
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
import torch

from .sampling import SamplingSettings, as_int

# the one value these may have here (others raise NotImplementedError / ValueError)
ONLY = {"num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "assistant_model": None}
IGNORED = ("bos_token_id", "output_attentions", "output_hidden_states", "synced_gpus", "position_ids",
           "cache_position", "num_logits_to_keep", "logits_to_keep", "return_legacy_cache", "tokenizer")
FLAGS = ("do_sample", "use_cache", "return_dict_in_generate", "output_scores", "output_logits")


@dataclass
class GenerateSettings:
    max_new_tokens: Optional[int] = None  # default 20 (transformers'), or what max_length leaves
    max_length: Optional[int] = None  # prompt (when input_ids are given) + new tokens
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = 50
    repetition_penalty: Optional[float] = 1.0
    eos_token_id: Any = None  # an id or a list of ids; default the model config's; [] turns EOS stopping off
    pad_token_id: Optional[int] = None  # for finished rows; default the first EOS id
    use_cache: bool = True  # the KV cache is always used; False is refused
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict, generation_config=None) -> "GenerateSettings":
        kwargs = dict(kwargs)
        for name, allowed in ONLY.items():
            if name in kwargs and kwargs.pop(name) != allowed:
                raise NotImplementedError(f"{name} is not supported by this generate (only {name}={allowed})")
        for name in IGNORED:
            kwargs.pop(name, None)
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"generate() got unexpected arguments: {unknown}")
        settings = cls(**{name: value for name, value in kwargs.items() if not (name in FLAGS and value is None)})
        for name in FLAGS:
            setattr(settings, name, as_flag(name, getattr(settings, name)))
        if generation_config is not None:
            defaults = config_values(generation_config)
            for name in ("max_new_tokens", "eos_token_id", "pad_token_id"):
                if getattr(settings, name) is None:
                    setattr(settings, name, defaults.get(name))
        if not settings.use_cache:
            raise ValueError("use_cache=False is not supported: generation always uses the KV cache")
        return settings

    def sampling(self, prompt_tokens: int, default_eos, vocab_size: int) -> SamplingSettings:
        """The checked SamplingSettings; `prompt_tokens` is what max_length counts besides new tokens,
        `default_eos` the model config's eos_token_id."""
        eos = token_ids("eos_token_id", self.eos_token_id if self.eos_token_id is not None else default_eos,
                        vocab_size)
        pad_token_id = self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0)
        token_ids("pad_token_id", pad_token_id, vocab_size)
        max_new_tokens = self.max_new_tokens
        if max_new_tokens is None and self.max_length is not None:
            max_new_tokens = as_int("max_length", self.max_length) - prompt_tokens
            if max_new_tokens < 1:
                raise ValueError(f"max_length={self.max_length} leaves no room for new tokens after the "
                                 f"{prompt_tokens}-token prompt; pass max_new_tokens, or a max_length above "
                                 f"{prompt_tokens}")
        return SamplingSettings(
            max_new_tokens=20 if max_new_tokens is None else max_new_tokens, min_new_tokens=self.min_new_tokens,
            do_sample=self.do_sample, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            eos_token_ids=tuple(eos), pad_token_id=pad_token_id,
        )


def as_flag(name: str, value) -> bool:
    """`value` (a bool or a numpy bool) as a bool; TypeError naming `name` for anything else (the string
    "False" would otherwise read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def config_values(generation_config) -> dict:
    """The settings of a transformers GenerationConfig; TypeError naming generation_config for anything else."""
    to_dict = getattr(generation_config, "to_dict", None)
    if isinstance(generation_config, dict) or not callable(to_dict):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                        f"{type(generation_config).__name__}; pass the settings as keyword arguments "
                        "(generate(..., **settings)) or wrap them: GenerationConfig(**settings)")
    return to_dict()


def token_ids(name, ids, vocab_size) -> list:
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


def check_hooks(streamer, stopping_criteria, logits_processor, generator) -> None:
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
