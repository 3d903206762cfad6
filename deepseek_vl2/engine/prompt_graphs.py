"""CUDA graphs of the decoder's layers over a prompt, for the continuous engine's prefill on CUDA.

An eager prefill launches some forty kernels per layer from Python, and the GPU waits for the host
about half the time (benchmarks/RESULTS.md: tiny, 2054 tokens, 18.4 ms for 7.9 ms of kernels). Here
each decoder layer over a prompt of `bucket` tokens (a multiple of PROMPT_BUCKET, up to the slot
capacity) is one graph, captured before the first request (`capture_all`). It reads and writes one
static buffer of hidden states, and writes the layer's cache entries to a prompt row (a one-row
cache: the engine's slots' prompt row, or a prefill device's) from position 0
(layer_pieces.prompt_layer with no cached tokens before the prompt).

A prompt runs padded up to its bucket. The padding tokens come after the prompt, so no prompt
token attends to them; their cache entries lie past the prompt, and only the prompt's go to the
request's slot (slots.take_prompt, or the remote prefill's copy). `GraphLayerPieces` advances a
prompt through the graphs with LayerPieces' interface; its cache and logits match the eager pieces
within rounding (the padded GEMMs may pick other kernels).
"""
import logging
import time
import weakref
from typing import Dict, Optional, Tuple

import torch

from ..generation.cuda_graphs import capture_each
from ..modeling.kv_cache import KVCache
from ..modeling.layer_pieces import last_token_logits, prompt_layer

logger = logging.getLogger(__name__)

PROMPT_BUCKET = 256  # prompts run padded up to a multiple of this many tokens (or to the slot capacity)


class PromptGraphs:
    """One CUDA graph per (prompt bucket, decoder layer) over the prompt row `prompt`, a one-row
    KVCache on the model's device (its capacity bounds the prompts)."""

    def __init__(self, lm, prompt: KVCache):
        if lm.device.type != "cuda":
            raise ValueError(f"prompt graphs need a model on CUDA, not {lm.device}")
        if prompt.batch_size != 1 or prompt.device != lm.device:
            raise ValueError(f"prompt graphs write one cache row on {lm.device}, not {prompt.batch_size} on "
                             f"{prompt.device}")
        self._lm = weakref.ref(lm)
        self.prompt = prompt
        capacity = prompt.capacity
        self.buckets = tuple(range(PROMPT_BUCKET, capacity, PROMPT_BUCKET)) + (capacity,)
        self.hidden = torch.zeros(1, capacity, lm.config.hidden_size, dtype=lm.dtype, device=lm.device)
        self.graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @property
    def lm(self):
        return self._lm()

    def bucket_for(self, tokens: int) -> int:
        """The bucket a prompt of `tokens` tokens runs in."""
        if not 0 < tokens <= self.buckets[-1]:
            raise ValueError(f"a prompt in the prompt row holds 1 to {self.buckets[-1]} tokens, not {tokens}")
        return next(bucket for bucket in self.buckets if bucket >= tokens)

    def _layer(self, bucket: int, index: int) -> None:
        x = self.hidden[:, :bucket]
        x.copy_(prompt_layer(self.lm, index, x, 0, self.prompt))

    def capture_all(self, stream: Optional[torch.cuda.Stream] = None) -> str:
        """Capture every (bucket, layer) (each writes the prompt row: before any prompt is there), on
        `stream` (capture_each); returns what was done, for the start-up log."""
        started = time.perf_counter()
        layers = len(self.lm.model.layers)
        # the longest prompts first (capture_each): the shorter ones reuse the memory they leave in the pool
        keys = [(bucket, index) for bucket in reversed(self.buckets) for index in range(layers)]
        self.graphs.update(capture_each(keys, self._layer, self.pool, self.hidden.device, stream))
        self.hidden.zero_()
        summary = (f"captured {len(self.graphs)} prompt-layer graphs ({layers} layers x {len(self.buckets)} prompt "
                   f"lengths up to {self.buckets[-1]}) in {time.perf_counter() - started:.1f} s")
        logger.info(summary)
        return summary


class GraphLayerPieces:
    """A prompt through the decoder in pieces of layers, replayed from `graphs` (the interface of
    layer_pieces.LayerPieces; the prompt starts at position 0 of the prompt row). One prompt at a
    time: it holds the graphs' hidden-state buffer until its last layer has run."""

    def __init__(self, graphs: PromptGraphs, embeds: torch.Tensor):
        self.graphs = graphs
        self.tokens = embeds.shape[1]
        self.bucket = graphs.bucket_for(self.tokens)
        graphs.hidden[:, : self.tokens].copy_(embeds)
        graphs.hidden[:, self.tokens : self.bucket].zero_()
        self.layers = len(graphs.lm.model.layers)
        self.next_layer = 0
        self.logits: Optional[torch.Tensor] = None

    @property
    def layers_left(self) -> int:
        return self.layers - self.next_layer

    def advance(self, layers: int) -> Optional[torch.Tensor]:
        """Replay up to `layers` (>= 1) more layers; after the last, the last prompt token's logits
        [1, vocab] (float32), else None."""
        if self.logits is not None:
            return self.logits
        end = min(self.next_layer + max(layers, 1), self.layers)
        for index in range(self.next_layer, end):
            self.graphs.graphs[(self.bucket, index)].replay()
        self.next_layer = end
        if end == self.layers:
            self.logits = last_token_logits(self.graphs.lm, self.graphs.hidden[:, : self.tokens])
        return self.logits
