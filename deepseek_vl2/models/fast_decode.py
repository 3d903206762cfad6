"""The GPU fast path for decoding (used by `generate` on CUDA; nothing to switch on).

A decode step of a MoE decoder is thousands of small kernels; launched one by one from Python
they, not the memory traffic, set the speed. So for each batch size:

  * the KV cache is static: allocated once for max_position_embeddings tokens, written at
    absolute slots, so every step has the same shapes and addresses;
  * each step runs as one replayed CUDA graph. Attention reads the cache up to a length bucket
    (a multiple of 256 tokens, one graph per bucket in use) with a mask for the slots not yet written;
  * the fixed-shape parts of every layer (norms, projections, RoPE, the MoE block, the LM head)
    go through torch.compile, which fuses their elementwise work. Layers share one compiled
    graph per kind (dense / MoE), since their parameters are graph inputs.

Compilation or capture problems are not fatal: the decoder falls back to plain kernels (and, if
capture fails, to eager steps), with a warning. With `use_graphs=False` and `compile=False` the
same code runs eagerly on any device, which is how the CPU tests check its logic.
"""
import logging
from typing import Dict, Optional

import torch

from .attention import AttentionInputs
from .kv_cache import KVCache

logger = logging.getLogger(__name__)

BUCKETS = tuple(range(256, 8192 + 1, 256))  # attended lengths a decode graph is made for


def _pre_attention(layer, x, cos, sin):
    return layer.pre_attention(x, cos, sin)


def _post_attention(layer, x, context):
    return layer.post_attention(x, context)


def _last_logits(lm, x):
    return lm.lm_head(lm.model.norm(x[:, -1])).float()


_COMPILED = {}


def _compiled(fn):
    """torch.compile'd version of `fn` (shared by all layers and models)."""
    if fn not in _COMPILED:
        import torch._dynamo

        # one graph per (model, batch size, layer kind): allow more than the default 8 entries
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


class StaticDecoder:
    """Static cache and per-bucket decode steps for one model and batch size."""

    def __init__(self, lm, batch_size: int, use_graphs: bool = True, compile: bool = True):
        config = lm.config
        self.lm = lm
        self.batch_size = batch_size
        self.capacity = config.max_position_embeddings
        device, dtype = lm.device, lm.dtype
        self.cache = KVCache(config, batch_size, self.capacity, device, dtype)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.use_graphs = use_graphs
        self.functions = (_pre_attention, _post_attention, _last_logits)
        if compile:
            self.functions = tuple(_compiled(fn) for fn in self.functions)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None

    def start(self, attention_mask: torch.Tensor, past: Optional[KVCache] = None) -> KVCache:
        """Begin a generation: `attention_mask` [B, n] marks real tokens over prompt + new tokens.
        A given prefilled cache is copied in. Returns the static cache (for the prefill forward)."""
        n = attention_mask.shape[1]
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit the static cache of {self.capacity}")
        self.visible.zero_()
        self.visible[:, :n] = attention_mask
        self.cache.length = 0
        if past is not None:
            self.cache.copy_from(past)
        return self.cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, vocab] (float32) for `tokens` [B] at rope `positions` [B], written to cache `slot`."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        kv_len = next((b for b in BUCKETS if b > slot), self.capacity)
        kv_len = min(kv_len, self.capacity)
        self.cache.length = slot + 1
        if not self.use_graphs:
            return self._run(kv_len)
        if kv_len not in self.graphs:
            self._capture(kv_len)
        if kv_len in self.graphs:
            self.graphs[kv_len].replay()
            return self.outputs[kv_len].clone()
        return self._run(kv_len)

    def _run(self, kv_len: int) -> torch.Tensor:
        """One decode step on the static buffers (what a graph captures)."""
        pre, post, last_logits = self.functions
        model = self.lm.model
        x = model.embed_tokens(self.tokens[:, None])
        cos, sin = model.rope.lookup(self.positions[:, None], x.dtype)
        keys = torch.arange(kv_len, device=x.device)
        visible = (keys[None, :] <= self.slot) & self.visible[:, :kv_len]
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~visible, torch.finfo(x.dtype).min)[:, None, None, :]
        attn = AttentionInputs(self.slot, kv_len, mask)
        for layer, kv in zip(model.layers, self.cache.layers):
            query, new_entries = pre(layer, x, cos, sin)
            x = post(layer, x, layer.self_attn.attend(query, new_entries, attn, kv))
        return last_logits(self.lm, x)

    def _capture(self, kv_len: int) -> None:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (compiles on first use)
                    self._run(kv_len)
        except Exception as err:  # noqa: BLE001  (a compiler problem must not stop generation)
            if self.functions[0] is _pre_attention:
                raise
            logger.warning("torch.compile of the decode step failed (%s); using plain kernels", err)
            self.functions = (_pre_attention, _post_attention, _last_logits)
            current.wait_stream(side)
            return self._capture(kv_len)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[kv_len] = self._run(kv_len)
        except RuntimeError as err:
            logger.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", err)
            self.use_graphs = False
            return
        self.graphs[kv_len] = graph


def decoder_for(lm, batch_size: int, keep: int = 3) -> StaticDecoder:
    """The model's StaticDecoder for this batch size (the `keep` most recent sizes are kept)."""
    decoders = lm.__dict__.setdefault("_static_decoders", {})
    stale = batch_size in decoders and (decoders[batch_size].cache.device != lm.device
                                        or decoders[batch_size].cache.dtype != lm.dtype)
    if stale:
        del decoders[batch_size]
    if batch_size not in decoders:
        while len(decoders) >= keep:
            decoders.pop(next(iter(decoders)))
        decoders[batch_size] = StaticDecoder(lm, batch_size)
    decoders[batch_size] = decoders.pop(batch_size)  # most recently used last
    return decoders[batch_size]
