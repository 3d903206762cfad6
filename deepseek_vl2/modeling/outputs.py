"""The objects `forward` and `generate` return, owned here rather than borrowed from transformers.

transformers' `ModelOutput` changes between releases (5.24 renames `past_key_values` to `cache`
when one is constructed), and code written against the official package reads these fields by
their old names. So the fields are fixed here, whatever transformers is installed:

    out.logits, out.past_key_values, out.loss, out.hidden_states      (forward)
    out.sequences, out.scores, out.logits, out.past_key_values        (generate, return_dict_in_generate)

They behave like transformers' outputs where code relies on it: `out["logits"]`, `out[0]` and
`out.to_tuple()` see only the fields that are set, in declaration order.
"""
from dataclasses import dataclass, fields
from typing import Any, Optional, Tuple

import torch


class OutputFields:
    """Dict- and tuple-like access to a dataclass's fields that are not None."""

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def keys(self):
        return [name for name, _ in self.items()]

    def values(self):
        return [value for _, value in self.items()]

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self.values())

    def get(self, name: str, default=None):
        return dict(self.items()).get(name, default)

    def __contains__(self, name) -> bool:
        return name in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())

    def __getitem__(self, key):
        if isinstance(key, str):
            present = dict(self.items())
            if key not in present:
                raise KeyError(f"{type(self).__name__} has no field {key!r} set; it has {sorted(present)}")
            return present[key]
        return self.to_tuple()[key]


@dataclass
class CausalLMOutput(OutputFields):
    """What the decoder's `forward` returns: float32 `logits` [B, S or logits_to_keep, vocab]."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Any = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class GenerateOutput(OutputFields):
    """What `generate(..., return_dict_in_generate=True)` returns."""
    sequences: Optional[torch.LongTensor] = None
    scores: Optional[Tuple[torch.Tensor, ...]] = None
    logits: Optional[Tuple[torch.Tensor, ...]] = None
    past_key_values: Any = None
