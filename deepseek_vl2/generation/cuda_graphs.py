"""The CUDA-graph decode runner: the GPU fast path of `generate` (on CUDA; nothing to switch on).

A decode step of a MoE decoder is thousands of small kernels; launched one by one from Python
they, not the memory traffic, set the speed. So for each batch size:

  * the KV cache is static: allocated once for max_position_embeddings tokens, written at
    absolute slots, so every step has the same shapes and addresses;
  * each step runs as one replayed CUDA graph. Attention reads the cache up to a length bucket
    (a multiple of 256 tokens, one graph per bucket in use) with a mask for the slots not yet written;
  * the fixed-shape parts of every layer (norms, projections, RoPE and the cache write, the MoE
    block, the LM head) go through torch.compile, which fuses their elementwise work. They come as
    the pieces between two attentions (one layer's end and the next one's start, so a layer's last
    residual sum fuses with the next norm), and layers share one compiled graph per pair of kinds
    (dense then MoE, MoE then MoE), since their parameters are graph inputs.

The runner reaches into no layer: the model hands it a step (`decode_step`) and the plain
functions of its fixed-shape parts (`decode_pieces`); the runner compiles private copies of those,
passes them back to the step, and captures / replays the step (gpt-fast's `decode_one_token`,
compiled from outside the model).

Greedy decoding goes further: the graph also picks the token (argmax, EOS suppressed before
min_new_tokens), records it, updates the finished rows and advances positions, so a step is one
graph replay and the host only reads "is any row still going" now and then.

Compilation or capture problems are not fatal: the decoder falls back to plain kernels (and, if
capture fails, to eager steps), with a warning. With `use_graphs=False` and `compile=False` the
same code runs eagerly on any device, which is how the CPU tests check its logic.

Lifetime (`decoder_for`): a model's decoders live in a registry keyed weakly by the model, and
refer to the model weakly, so `del model` frees the model, its static caches and graphs at once
(no reference cycle waiting for the garbage collector). A decoder is reused only while the
model's tensors are the ones its graphs captured: the registry keeps a fingerprint of their
storages and starts afresh when it changes (moved, cast, or given new tensors). Each decoder
compiles its own copies of the step functions, so what torch.compile caches for it dies with it.
"""
import itertools
import logging
import types
import weakref
from typing import Callable, Dict, Optional, Sequence

import torch

from ..kernels import custom_ops
from ..modeling.kv_cache import KVCache
from . import inductor_choices

logger = logging.getLogger(__name__)

BUCKETS = tuple(range(256, 8192 + 1, 256))  # attended lengths a decode graph is made for


def _greedy_advance(logits, state):
    """Greedy mode's end of a step on the device state (`StaticDecoder._greedy_state`): choose the
    next token of every row (EOS suppressed before min_new_tokens, pad for finished rows), record
    it, update the finished rows and advance positions."""
    tokens, positions, slot, unfinished, count, chosen, alive, is_eos, pad, min_new = state
    logits = logits.masked_fill((count < min_new) & is_eos, float("-inf"))
    choice = torch.where(unfinished, logits.argmax(dim=-1), pad)
    chosen[:, count] = choice[:, None]
    unfinished &= ~is_eos[choice]
    alive[count] = unfinished.any()
    tokens.copy_(choice)
    positions.add_(1)
    slot.add_(1)
    count.add_(1)


def compile_options() -> dict:
    """torch.compile's arguments for the decode pieces: whole graphs at fixed shapes, inductor's kernels
    launched as ours are (custom_ops.compiled_kernel_options; inductor applies dependent launches on
    compute capability 9.0 and later only), its heuristics named as `_compiled_copies` applies them
    (inductor_choices.config_options)."""
    return dict(fullgraph=True, dynamic=False,
                options={**custom_ops.compiled_kernel_options(), **inductor_choices.config_options()})


def _compiled_copies(functions):
    """torch.compile'd private copies of `functions` and their code objects, compiled under
    inductor_choices.decode_heuristics (norms of a hidden row up to 4096 wide in one pass).

    Dynamo keeps compiled entries (guards, graphs) on the function's code object. Shared functions
    would collect entries for every model, batch size and layer kind the process ever used, up to
    a recompile limit past which they silently run uncompiled. Fresh code objects give each decoder
    its own few entries (one per layer kind, within dynamo's default limit), which `_forget` drops."""
    custom_ops.register_kernel_ops()
    codes = tuple(fn.__code__.replace() for fn in functions)
    copies = tuple(inductor_choices.with_decode_heuristics(
        torch.compile(types.FunctionType(code, fn.__globals__, fn.__name__), **compile_options()))
        for fn, code in zip(functions, codes))
    return copies, codes


def _forget(codes) -> None:
    """Drop dynamo's entries for a dead decoder's code copies. Dynamo maps each compiled code back
    to its source code, which holds the entries: a cycle through C++ that the garbage collector
    cannot break, so without this every decoder's compiled steps would stay for good."""
    from torch._dynamo import eval_frame, utils

    for code in codes:
        if hasattr(eval_frame, "reset_code"):
            eval_frame.reset_code(code)
        getattr(utils, "guard_failures", {}).pop(code, None)


class StaticDecoder:
    """Static cache and per-bucket decode steps for one model and batch size."""

    def __init__(self, lm, batch_size: int, use_graphs: bool = True, compile: bool = True, compile_after: int = 0):
        """`compile_after`: decode steps run on plain kernels (in CUDA graphs) before the step
        functions are compiled; compiling costs seconds once, and saves some microseconds a step."""
        config = lm.config
        self._lm = weakref.ref(lm)  # the model owns its decoders (see decoder_for), not the reverse
        self._step = type(lm).decode_step  # called with the model: no reference to it kept here
        self._plain = (*type(lm).decode_pieces, _greedy_advance)
        self.batch_size = batch_size
        self.capacity = config.max_position_embeddings
        device, dtype = lm.device, lm.dtype
        self.cache = KVCache(config, batch_size, self.capacity, device, dtype)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        # greedy mode state (all on the device, read and written by the graphs)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.is_eos = torch.zeros(config.vocab_size, dtype=torch.bool, device=device)
        self.pad = torch.zeros(1, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # index of the token being chosen
        self.min_new = torch.zeros(1, dtype=torch.long, device=device)
        self.chosen = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
        self.alive = torch.zeros(self.capacity, dtype=torch.bool, device=device)  # any row going after step i
        self.use_graphs = use_graphs
        self.functions = self._plain
        self.codes = ()  # the compiled copies' code objects (where dynamo keeps their entries)
        self.graphs: Dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[tuple, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.steps_until_compile = compile_after if compile else None  # None: never compile
        if compile and compile_after <= 0:
            self._compile()

    def _compile(self) -> None:
        """Switch to compiled step functions; graphs of the plain ones are recaptured as used."""
        self.steps_until_compile = None
        self.functions, self.codes = _compiled_copies(self._plain)
        weakref.finalize(self, _forget, self.codes).atexit = False
        self.graphs.clear()
        self.outputs.clear()

    @property
    def lm(self):
        lm = self._lm()
        if lm is None:
            raise RuntimeError("the model of this StaticDecoder has been deleted")
        return lm

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
        return self._replay("logits", slot).clone()

    def start_greedy(self, first: torch.Tensor, positions: torch.Tensor, slot: int, unfinished: torch.Tensor,
                     eos_ids, pad_id: int, min_new_tokens: int) -> None:
        """Greedy mode: `first` [B] is token 0 (chosen from the prefill logits), to be fed at cache
        `slot` and rope `positions`; `unfinished` are the rows still going before it."""
        self.tokens.copy_(first)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        self.is_eos.zero_()
        if eos_ids:
            self.is_eos[list(eos_ids)] = True
        self.unfinished.copy_(unfinished & ~self.is_eos[first])
        self.pad.fill_(pad_id)
        self.count.fill_(1)
        self.min_new.fill_(min_new_tokens)
        self.chosen[:, 0] = first
        self.alive[0] = self.unfinished.any()

    def greedy_step(self, slot: int) -> None:
        """Choose the next token of every row (it lands in `chosen`); `slot` is where the previous
        token goes in the cache (the host's count of the device's `slot`)."""
        self._replay("greedy", slot)

    def _replay(self, kind: str, slot: int):
        kv_len = min(next((b for b in BUCKETS if b > slot), self.capacity), self.capacity)
        self.cache.length = slot + 1
        run = self._run if kind == "logits" else self._run_greedy
        if self.steps_until_compile is not None:
            self.steps_until_compile -= 1
            if self.steps_until_compile < 0:
                self._compile()
        if not self.use_graphs:
            return run(kv_len)
        key = (kind, kv_len)
        if key not in self.graphs:
            self._capture(key, run, kv_len)
        if key in self.graphs:
            self.graphs[key].replay()
            return self.outputs[key]
        return run(kv_len)

    def _run(self, kv_len: int) -> torch.Tensor:
        """One decode step on the static buffers (what a graph captures)."""
        return self._step(self.lm, self.tokens, self.positions, self.slot, self.visible, kv_len, self.cache,
                          self.functions[:3])

    def _run_greedy(self, kv_len: int) -> torch.Tensor:
        """A decode step that also picks and records the next token and advances the state."""
        self.functions[3](self._run(kv_len), self._greedy_state())
        return self.tokens

    def _greedy_state(self):
        return self._state() + (self.is_eos, self.pad, self.min_new)

    def _capture(self, key, run, kv_len: int) -> None:
        state = [t.clone() for t in self._state()]  # warm-up runs advance the greedy state: put it back
        current = torch.cuda.current_stream()
        side = warmup_stream(current.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (compiles on first use)
                    run(kv_len)
        except Exception as err:  # noqa: BLE001  (a compiler problem must not stop generation)
            if self.functions is self._plain:
                raise
            logger.warning("torch.compile of the decode step failed (%s); using plain kernels", err)
            self.functions = self._plain
            current.wait_stream(side)
            self._restore(state)
            return self._capture(key, run, kv_len)
        current.wait_stream(side)
        self._restore(state)
        graph = torch.cuda.CUDAGraph()
        try:
            # on the warm-up stream: torch.cuda.graph's default capture stream belongs to whichever
            # GPU was current when it was first made, and a capture for another GPU records nothing
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                self.outputs[key] = run(kv_len)
        except RuntimeError as err:
            logger.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", err)
            self.use_graphs = False
            return
        self.graphs[key] = graph

    def _state(self):
        return (self.tokens, self.positions, self.slot, self.unfinished, self.count, self.chosen, self.alive)

    def _restore(self, saved) -> None:
        for live, copy in zip(self._state(), saved):
            live.copy_(copy)


_WARMUP_STREAMS = {}


def warmup_stream(device) -> torch.cuda.Stream:
    """One warm-up stream per GPU for all captures: cuBLAS keeps a workspace per stream it has
    run on, so a new stream per capture would leave a workspace behind for each of the pool's
    streams (up to 32, several MiB each) that no model deletion gives back."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def capture_each(keys: Sequence, run: Callable, pool, device, stream: Optional[torch.cuda.Stream] = None) -> dict:
    """{key: a CUDA graph of run(*key)} for each key, each run once first (cuBLAS workspaces, Triton
    autotuning), on `stream` (default: `device`'s warm-up stream). A graph's kernels run with the
    resources of the stream it was captured on, wherever it is replayed: a stream of a green context
    (devices.partition_stream) captures graphs that keep to its SMs. In inference mode, as the
    continuous engine runs its graphs: the dispatcher picks the Triton kernels only without autograd
    (captured with it, a graph would hold the slower reference ops). Give the largest key first: the
    graphs share `pool`, and a capture reuses the blocks an earlier one freed only where they are
    large enough, so captures of growing sizes leave each its own (tiny's 192 prompt-layer graphs
    held 1,920 MiB captured shortest prompt first, 458 MiB longest first; benchmarks/RESULTS.md)."""
    graphs = {}
    current = torch.cuda.current_stream(device)
    side = stream if stream is not None else warmup_stream(current.device)
    side.wait_stream(current)
    with torch.inference_mode(), torch.cuda.stream(side):
        for key in keys:
            run(*key)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):
                run(*key)
            graphs[key] = graph
    current.wait_stream(side)
    torch.cuda.synchronize(current.device)
    return graphs


# model -> (fingerprint of its tensors, {batch size: StaticDecoder}); an entry goes with its model
_DECODERS = weakref.WeakKeyDictionary()


def weights_fingerprint(lm) -> tuple:
    """Where the model's tensors live: a CUDA graph reads its weights at the addresses it captured,
    so a decoder stays valid exactly as long as this is unchanged. In-place updates (load_state_dict
    copying into the parameters) keep it, and the graphs then read the new values."""
    tensors = itertools.chain.from_iterable(
        itertools.chain(m._parameters.values(), m._buffers.values()) for m in lm.modules())  # one walk
    return (lm.device, lm.dtype, tuple(t.data_ptr() for t in tensors if t is not None))


def decoder_for(lm, batch_size: int, keep: int = 3, **options) -> StaticDecoder:
    """The model's StaticDecoder for this batch size (the `keep` most recent sizes are kept); a new
    one gets `options` (StaticDecoder's use_graphs / compile). All are dropped when the model's
    tensors have moved or been replaced since they were made."""
    fingerprint = weights_fingerprint(lm)
    entry = _DECODERS.get(lm)
    if entry is None or entry[0] != fingerprint:
        _DECODERS.pop(lm, None)  # free the stale decoders' caches before making new ones
        entry = _DECODERS[lm] = (fingerprint, {})
    decoders = entry[1]
    if batch_size not in decoders:
        while len(decoders) >= keep:
            decoders.pop(next(iter(decoders)))
        decoders[batch_size] = StaticDecoder(lm, batch_size, **options)
    decoders[batch_size] = decoders.pop(batch_size)  # most recently used last
    return decoders[batch_size]


def release_decoders(lm) -> None:
    """Free the model's static caches, graphs and compiled steps now (the next generate remakes them)."""
    _DECODERS.pop(lm, None)
