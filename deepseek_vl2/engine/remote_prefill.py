"""Prefill on another device: the continuous engine decodes on its GPU while a copy of the model on a
second device (`ContinuousEngine(..., prefill=PrefillSettings(device="cuda:1"))`, the server's
`--prefill-device`) runs every prompt's images and decoder layers, on a thread of its own. No decode
step ever waits behind a prompt's vision tower or layers; a step only waits for the copy of a
finished prompt's cache into its slot.

    engine thread                          prefill thread (the prefill device current)
    admit: a slot, `add` -> queue    --->  prompt embeddings (images through the tower), then
                                           every decoder layer over the prompt into the prompt
    `take_ended`: the row's cache    <---  row there, and the last token's logits
      and logits copied to the slot,
      its first token chosen there

The prompt's cache lands in the decode device's slot by one device-to-device copy per layer (over
NVLink between GPUs). It is issued by the engine's thread with a copy stream of the prefill device
current, and PyTorch orders such a copy after the work already queued on the decode device's stream
and before what follows: the decode step then in flight is never overtaken, the next one sees the
prompt. The prefill device's own stream is not involved, so the copy does not wait for the next
prompt's prefill. The next prompt goes through the vision tower meanwhile; its decoder layers wait
(on the device) for an event recorded behind the copy before they write the prompt row again.

The model there is made by `devices.replicate` from the engine's model, tensor by tensor, so the
decode device never holds a second copy. Its decoder layers over a prompt replay CUDA graphs
captured at start-up (prompt_graphs.py, on the prefill device's prompt row), as the engine's own
prefill does, and its vision tower runs eagerly. The prefill thread shares the interpreter with the
engine's: graphs keep its host work, and so its waits for the interpreter lock, to a few launches
per layer. Without graphs (another dtype than bfloat16 / float16, or a CPU) the layers run eagerly
in forwards of `chunk` tokens, after a short prompt at start-up that compiles their kernels. Of the
PrefillSettings only `chunk` applies; the piece sizes are for prefill between decode steps.

A request cancelled while its prompt is prefilled is skipped by the prefill thread if it has not
started, and its prefill is dropped when it ends; an error in one prompt fails that request.
"""
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..kernels.dispatch import decode_is_capturable
from ..modeling.devices import current, indexed, replicate
from ..modeling.kv_cache import KVCache
from ..modeling.layer_pieces import LayerPieces
from .prefill import Prefilled, first_token
from .prompt_graphs import GraphLayerPieces, PromptGraphs
from .requests import ActiveRequest

WARM_UP_TOKENS = 64


@dataclass
class _Row:
    """The prefill device's prompt row, passed between the threads: the prefill thread holds it from
    a prompt's first decoder layer until the engine has issued that prompt's copy."""

    copied: Optional[torch.cuda.Event] = None  # recorded behind the last copy out of it (between GPUs)


@dataclass
class _Done:
    """A prompt the prefill thread finished: the prompt row holding its cache and its last-token
    logits, or its error (neither: skipped, the request was cancelled before its turn)."""

    request: ActiveRequest
    row: Optional[_Row] = None
    logits: Optional[torch.Tensor] = None
    error: Optional[Exception] = None


class RemotePrefill:
    """The admitted requests not decoding yet (`requests`), prefilled on `device` (see the module's
    docstring). The engine calls `add`, `take_ended` and `close`, and reads `ended`."""

    def __init__(self, engine, device, chunk: int, use_graphs: bool, on_ended: Callable[[], None]):
        """`engine`: the ContinuousEngine (its model, slots and histories); `device`: where prompts are
        prefilled, another device than the engine's; `chunk`: prompt tokens per eager forward;
        `use_graphs`: the decoder layers as CUDA graphs (where the prefill device can capture them);
        `on_ended()`: called on the prefill thread when a prompt is ready (wakes the engine)."""
        device = indexed(device)
        if device.type == "cuda" and device == engine.device:
            raise ValueError(f"the prefill device must be another device than the model's ({engine.device}); "
                             "prefill on the decoding GPU itself is the engine's default")
        self.device = device
        self.engine = engine
        self._on_ended = on_ended
        self.slots, self.histories, self.next_tokens = engine.slots, engine.histories, engine.next_tokens
        self.model = replicate(engine.model, device)
        self.lm = getattr(self.model, "language", self.model)
        self.chunk = chunk
        self.prompt = KVCache(self.lm.config, 1, engine.slots.capacity, device, self.lm.dtype)
        self.graphs = None
        with current(device):
            if use_graphs and decode_is_capturable(device, self.lm.dtype):
                self.graphs = PromptGraphs(self.lm, self.prompt)
                self._startup = self.graphs.capture_all()
            else:
                self._warm_up()
                self._startup = "decoder layers eager"
        self.requests: List[ActiveRequest] = []  # admitted, in admission order (the engine removes ended ones)
        self._todo: queue.Queue = queue.Queue()  # requests for the prefill thread; None: stop
        self._rows: queue.Queue = queue.Queue()  # holds the prompt row while the prefill thread may take it
        self._rows.put(_Row())
        self._done: deque = deque()  # _Done, from the prefill thread
        between_gpus = device.type == "cuda" and engine.device.type == "cuda"
        self._copies = torch.cuda.Stream(device) if between_gpus else None  # see _copy_out
        self._thread = threading.Thread(target=self._work, name="remote-prefill", daemon=True)
        self._thread.start()

    def summary(self) -> str:
        return f"prompts prefilled on {self.device} by a copy of the model there ({self._startup})"

    # ---- the engine's thread --------------------------------------------------------------------

    def add(self, request: ActiveRequest) -> None:
        self.requests.append(request)
        self._todo.put(request)

    @property
    def ended(self) -> bool:
        """Whether a prefill has ended since the last `take_ended`."""
        return bool(self._done)

    def take_ended(self) -> List[Prefilled]:
        """The prefills that ended since the last call: each prompt's cache copied into its slot and
        its first token chosen on the engine's device (or its error). Requests that ended meanwhile
        (cancelled) are dropped."""
        ended = []
        while self._done:
            done = self._done.popleft()
            request = done.request
            if done.row is not None:
                if not request.done:
                    logits = self._copy_out(done)
                    ended.append(first_token(request, logits, self.histories, self.next_tokens))
                self._rows.put(done.row)
            elif done.error is not None and not request.done:
                ended.append(Prefilled(request, error=done.error))
            else:
                continue  # skipped: the engine ends the cancelled request itself
            if request in self.requests:
                self.requests.remove(request)
        return ended

    def close(self) -> None:
        self._todo.put(None)
        self._rows.put(None)  # wakes a thread waiting for a free row
        self._thread.join(timeout=30)

    def _copy_out(self, done: _Done) -> torch.Tensor:
        """The prompt's cache from its buffer row into the request's slot, and its logits onto the
        engine's device, ordered on the engine's stream (see the module's docstring)."""
        request = done.request
        source = self.prompt.rows(0, 1)
        source.length = request.prompt_len
        if self._copies is None:
            self.slots.cache.rows(request.slot, 1).copy_from(source)
            return done.logits.to(self.engine.device)
        with torch.cuda.stream(self._copies):
            self.slots.cache.rows(request.slot, 1).copy_from(source)
            logits = done.logits.to(self.engine.device)
            done.logits.record_stream(self._copies)  # its memory is not reused before the copy has read it
            done.row.copied = torch.cuda.Event()
            done.row.copied.record(self._copies)
        return logits

    # ---- the prefill thread ---------------------------------------------------------------------

    def _work(self) -> None:
        with current(self.device), torch.inference_mode():
            while True:
                request = self._todo.get()
                if request is None:
                    return
                if request.done or request.handle.cancelled:
                    request.inputs = None
                    self._hand_over(_Done(request))
                    continue
                row = None
                try:
                    embeds = self._embeddings(request.inputs)
                    row = self._rows.get()
                    if row is None:
                        return
                    self._hand_over(_Done(request, row, logits=self._layers(embeds, row)))
                except Exception as error:  # this request fails; the thread goes on with the next
                    if row is not None:
                        self._rows.put(row)
                    self._hand_over(_Done(request, error=error))
                finally:
                    request.inputs = None

    def _embeddings(self, inputs) -> torch.Tensor:
        """A request's prompt embeddings [1, T, hidden] (its images through the tower)."""
        if isinstance(inputs, torch.Tensor):  # token ids for a bare decoder
            return self.lm.get_input_embeddings()(inputs.to(self.device, non_blocking=True))
        return self.model.prepare_inputs_embeds(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                                inputs.images_spatial_crop)

    def _layers(self, embeds: torch.Tensor, row: _Row) -> torch.Tensor:
        """The prompt through every decoder layer into the prompt row, once the last copy out of it
        has been made: its last logits, computed (the thread waits for the device, so the engine's
        copy never waits on it)."""
        if row.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(row.copied)
        if self.graphs is not None:
            logits = GraphLayerPieces(self.graphs, embeds).advance(len(self.lm.model.layers))
        else:
            logits = LayerPieces(self.lm, embeds, self.prompt.rows(0, 1), self.chunk).advance(len(self.lm.model.layers))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return logits

    def _warm_up(self) -> None:
        """A short prompt through every eager layer (the Triton kernels of the prefill device compile
        here, not at the first request)."""
        ids = torch.zeros(1, min(WARM_UP_TOKENS, self.slots.capacity - 1), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._layers(self.lm.get_input_embeddings()(ids), _Row())

    def _hand_over(self, done: _Done) -> None:
        self._done.append(done)
        self._on_ended()
