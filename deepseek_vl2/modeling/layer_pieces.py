"""A prompt's prefill through the decoder a few layers at a time, for a caller that interleaves
other work between the pieces (the continuous engine's decode steps).

`LayerPieces(lm, embeds, cache, chunk)` does what `lm(inputs_embeds=embeds, past_key_values=cache,
logits_to_keep=1)` run in forwards of `chunk` tokens does, in another order: `advance(n)` takes the
next n decoder layers over every chunk of the prompt, where the forwards take every layer over one
chunk. Each (chunk, layer) meets the same inputs and the same cache entries either way, so the cache
and the last token's logits come out the same to the bit.

Why layers rather than token chunks: a chunk of a few hundred prompt tokens routes over every
expert of an MoE layer, so each chunk reads all the layer's expert weights again. A piece of layers
reads each of its layers' weights once per `chunk` tokens, however long the prompt.
"""
from typing import Optional

import torch

from .attention import build_attention_inputs
from .kv_cache import KVCache


def prompt_layer(lm, index: int, x: torch.Tensor, past: int, cache: KVCache) -> torch.Tensor:
    """Decoder layer `index` over prompt tokens x [1, S, hidden] at positions past .. past + S - 1,
    attending to the `past` entries before them in `cache` and to each other causally; writes the
    layer's entries for them. The same operations as that layer in a forward of these tokens."""
    S = x.shape[1]
    attn = build_attention_inputs(None, past, S, past + S, x.dtype, x.device)
    positions = torch.arange(past, past + S, device=x.device).unsqueeze(0)
    rope = lm.model.rope.lookup(positions, x.dtype, seq_len=attn.kv_len)
    return lm.model.layers[index](x, rope, attn, cache.layer(index))


def last_token_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [1, vocab] (float32) of the last token of the final layer's states [1, S, hidden]."""
    return lm.lm_head(lm.model.norm(hidden[:, -1:])).float()[:, -1]


class LayerPieces:
    """The decoder over one prompt row in pieces of layers (see the module's docstring)."""

    def __init__(self, lm, embeds: torch.Tensor, cache: KVCache, chunk: int):
        """`lm` a DeepseekV2ForCausalLM on one device; `embeds` [1, T, hidden] the prompt tokens not in
        `cache` yet, which follow its `cache.length` tokens; `chunk` tokens per forward."""
        if lm.model.split is not None:
            raise ValueError("LayerPieces runs a decoder on one device; this one is spread over several")
        if embeds.dim() != 3 or embeds.shape[0] != 1:
            raise ValueError(f"LayerPieces takes one prompt row [1, T, hidden], got {tuple(embeds.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.lm, self.cache, self.chunk = lm, cache, chunk
        self.past = cache.length
        self.hidden = embeds
        self.next_layer = 0
        self.logits: Optional[torch.Tensor] = None

    @property
    def layers_left(self) -> int:
        return len(self.lm.model.layers) - self.next_layer

    def advance(self, layers: int) -> Optional[torch.Tensor]:
        """Run up to `layers` (>= 1) more decoder layers over the whole prompt; once the last has run,
        the cache holds the prompt (its length set) and the last token's logits [1, vocab] (float32)
        are returned, else None."""
        if self.logits is not None:
            return self.logits
        end = min(self.next_layer + max(layers, 1), len(self.lm.model.layers))
        T = self.hidden.shape[1]
        outputs = []
        for start in range(0, T, self.chunk):
            x = self.hidden[:, start : start + self.chunk]
            for i in range(self.next_layer, end):
                x = prompt_layer(self.lm, i, x, self.past + start, self.cache)
            outputs.append(x)
        self.hidden = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        self.next_layer = end
        if end == len(self.lm.model.layers):
            self.cache.length = self.past + T
            self.logits, self.hidden = last_token_logits(self.lm, self.hidden), None
        return self.logits
