"""Prefill on a thread of its own, beside the decode steps instead of between them: the continuous
engine decodes on its GPU while every prompt's images and decoder layers run elsewhere, so no decode
step waits behind a prompt's vision tower, its layers or the copy of its cache. Elsewhere is either

- a second device, with a copy of the model there (`PrefillSettings(device="cuda:1")`, the server's
  `--prefill-device`), or
- some SMs of the decoding GPU itself, set aside for prefill (`PrefillSettings(sms=64)`, or
  `sms="auto"`: half of them, the server's default; `--prefill-sms`): a CUDA green context
  (devices.partition_stream) whose stream the prefill thread runs on, with the engine's own model.
  Its kernels occupy only those SMs, so a decode step always finds the others free. A plain stream
  of low priority does not do that: the prompt's kernels fill every SM (on an H200 a decode-like
  graph took 0.16 ms alone, 2.8-3.1 ms beside large GEMMs on such a stream, 0.23 ms with the GEMMs
  on 66 of the 132 SMs; benchmarks/green_context_probe.py). Graphs keep to the SMs of the stream
  they were captured on, wherever they are replayed, so the prompt graphs are captured on the green
  context's stream.
  While no row decodes, or the engine is busy (as prefill between the steps prefills whole then,
  continuous.py), a prompt runs on the whole GPU instead, on a stream and graphs of its own: the
  prompts' two lanes (`_Lane`).

    engine thread                          prefill thread (the prefill device current)
    admit: a slot, `add` -> queue    --->  prompt embeddings (images through the tower), then
                                           every decoder layer over the prompt into the prompt
                                           row there; the row's cache copied into the slot, the
    `take_ended`: its first token    <---  last token's logits onto the engine's device
      chosen there

The prompt's cache lands in the decode device's slot by one copy per layer, issued by the prefill
thread as soon as the prompt's layers have run: between GPUs (over NVLink) on a stream of its own on
each device, on the decoding GPU on the prefill stream itself. The decode steps never wait for it,
and the engine's thread does not spend its time launching it. Two events order it: the copy waits
(on the device) for the decode steps launched before the request was admitted, which may still
write the slot's entries of the request that held it before (`add` records that point), and the
engine's stream waits for the copy only when the request joins the running rows (`take_ended`), when
it has long ended. A slot not yet decoding is not read by a step except as a masked dummy row, so
the copy may land while steps run. The next prompt's decoder layers wait (on the device) for the
copy out of the prompt row before they write it again; its vision tower runs meanwhile. On the
decoding GPU the thread does not wait for a prompt's work: it launches the next prompt's before it
hands the last one over (when its copy has run), so the prefill stream stays fed while the thread
waits for the interpreter lock.

On a second device the model is made by `devices.replicate` from the engine's model, tensor by
tensor, so the decode device never holds a second copy. The decoder layers over a prompt replay CUDA
graphs captured at start-up (prompt_graphs.py, on the prefill device's prompt row, or the engine's
on its own GPU), as the engine's own prefill does, and so does the vision tower over the prompt's
tiles (tower_graphs.py, one graph per tile count). The prefill thread shares the interpreter with
the engine's: graphs keep its host work, and so its share of the interpreter, to a few launches per
layer. Without graphs (another dtype than bfloat16 / float16, or a CPU) the tower and
the layers run eagerly, the layers in forwards of `chunk` tokens, after a short prompt at start-up
that compiles their kernels. Of the PrefillSettings only `chunk` applies; the piece sizes are for
prefill between decode steps.

A request cancelled while its prompt is prefilled is skipped by the prefill thread if it has not
started, and its prefill is dropped when it ends; an error in one prompt fails that request.
"""
import contextlib
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..kernels.dispatch import decode_is_capturable
from ..modeling.devices import current, indexed, partition_stream, replicate
from ..modeling.kv_cache import KVCache
from ..modeling.layer_pieces import LayerPieces
from .prefill import Prefilled, first_token
from .prompt_graphs import GraphLayerPieces, PromptGraphs
from .requests import ActiveRequest
from .tower_graphs import TowerGraphs, tiles_per_image

WARM_UP_TOKENS = 64
SM_GROUP = 8  # a green context on an H100 / H200 holds a multiple of 8 SMs

logger = logging.getLogger(__name__)


def auto_prefill_sms(device: torch.device) -> Optional[int]:
    """The SMs `PrefillSettings(sms="auto")` sets aside for prompts on `device`: half of its SMs,
    rounded down to a multiple of SM_GROUP (an H200: 64 of its 132), or None where none can be set
    aside (not a CUDA GPU; no green contexts in this torch, driver or GPU): prompts are then
    prefilled between the decode steps. Why half: on an H200, under Poisson arrivals at half the
    32-client rate, tiny's inter-token p99 was 2.75 ms (two runs) with 64 SMs, 2.82 with 88 and 3.72
    with 48, small's 5.42 with 64 and 6.22 with 88, at the same throughput within 3%
    (benchmarks/RESULTS.md, twenty-first session): fewer SMs leave more to the decode steps beside a
    prompt, until the prompts take so long that more of the steps have one beside them."""
    if device.type != "cuda":
        return None
    sms = max(SM_GROUP, torch.cuda.get_device_properties(device).multi_processor_count // 2 // SM_GROUP * SM_GROUP)
    try:
        partition_stream(device, sms)  # a trial: green contexts work here (this one is dropped)
    except ValueError as error:
        logger.info("prompts are prefilled between the decode steps: %s", error)
        return None
    return sms


def stream_or_none(stream):
    """A context with `stream` current (a no-op for None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


@dataclass
class _Lane:
    """Where the prefill thread runs a prompt: a stream (None: the prefill device's current one) and
    the decoder-layer graphs captured on it (None: eager)."""

    stream: Optional[torch.cuda.Stream]
    graphs: Optional[PromptGraphs] = None
    tower: Optional[TowerGraphs] = None  # the vision tower's graphs (None: eager, or no tower)
    prompts: int = 0  # prompts run in this lane


@dataclass
class _Done:
    """A prompt the prefill thread finished: its last-token logits on the engine's device once its
    cache is in the request's slot (`copied`: recorded behind the copy, between GPUs and beside the
    steps), or its error (neither: skipped, the request ended before its cache was copied)."""

    request: ActiveRequest
    logits: Optional[torch.Tensor] = None
    copied: Optional[torch.cuda.Event] = None
    error: Optional[Exception] = None


class PrefillThread:
    """The admitted requests not decoding yet (`requests`), prefilled on `device` (see the module's
    docstring). The engine calls `add`, `take_ended` and `close`, and reads `ended`."""

    def __init__(self, engine, device, chunk: int, use_graphs: bool, on_ended: Callable[[], None],
                 sms: Optional[int] = None):
        """`engine`: the ContinuousEngine (its model, slots and histories); `device`: where prompts are
        prefilled, another device than the engine's, or with `sms` the engine's GPU itself, on that
        many of its SMs; `chunk`: prompt tokens per eager forward; `use_graphs`: the decoder layers
        as CUDA graphs (where the prefill device can capture them); `on_ended()`: called on the
        prefill thread when a prompt is ready (wakes the engine)."""
        device = indexed(device)
        self.beside = sms is not None
        if self.beside and engine.device.type != "cuda":
            raise ValueError(f"SMs set aside for prefill (sms={sms}) are SMs of the model's GPU, and it is on "
                             f"{engine.device}: there are none to set aside")
        if self.beside and device != engine.device:
            raise ValueError(f"SMs set aside for prefill (sms={sms}) are SMs of the model's GPU, and it is on "
                             f"{engine.device}, not on {device}")
        if device.type == "cuda" and device == engine.device and not self.beside:
            raise ValueError(f"the prefill device must be another device than the model's ({engine.device}); "
                             "prefill on the decoding GPU itself is the engine's default (or give sms)")
        self.device = device
        self.engine = engine
        self._on_ended = on_ended
        self.slots, self.histories, self.next_tokens = engine.slots, engine.histories, engine.next_tokens
        self.model = engine.model if self.beside else replicate(engine.model, device)
        self.lm = getattr(self.model, "language", self.model)
        self.chunk = chunk
        self.prompt = engine.slots.prompt if self.beside else KVCache(self.lm.config, 1, engine.slots.capacity, device,
                                                                      self.lm.dtype)
        self._row_copied: Optional[torch.cuda.Event] = None  # behind the last copy out of the prompt row
        self.sms = sms
        if self.beside:  # a lane on the SMs set aside (a green context), one on the whole GPU
            stream, self._partition = partition_stream(device, sms)
            self.set_aside, self.whole_gpu = _Lane(stream), _Lane(torch.cuda.Stream(device))
        else:
            self.elsewhere = _Lane(None)
        with current(device):
            if use_graphs and decode_is_capturable(device, self.lm.dtype):
                captured = []
                for lane in self._lanes():  # each lane's graphs keep to its stream's SMs
                    lane.graphs = PromptGraphs(self.lm, self.prompt)
                    captured.append(lane.graphs.capture_all(lane.stream))
                    if hasattr(self.model, "vision"):
                        lane.tower = TowerGraphs(self.model, tiles_per_image(self.model.config))
                        captured.append(lane.tower.capture_all(lane.stream))
                self._startup = "; ".join(captured)
            else:
                self._warm_up()
                self._startup = "decoder layers eager"
        self.requests: List[ActiveRequest] = []  # admitted, in admission order (the engine removes ended ones)
        self._todo: queue.Queue = queue.Queue()  # (request, slot_free event) for the prefill thread; None: stop
        self._done: deque = deque()  # _Done, from the prefill thread
        between_gpus = device.type == "cuda" and engine.device.type == "cuda" and not self.beside
        # the copies' streams on the prefill device and on the engine's (see _into_slot)
        self._copies = torch.cuda.Stream(device) if between_gpus else None
        self._landing = torch.cuda.Stream(engine.device) if between_gpus else None
        self._thread = threading.Thread(target=self._work, name="prefill-thread", daemon=True)
        self._thread.start()

    def summary(self) -> str:
        if self.beside:
            total = torch.cuda.get_device_properties(self.device).multi_processor_count
            return (f"prompts prefilled beside the decode steps on {self.sms} of the {total} SMs of {self.device}, "
                    f"on all of them while no row decodes or the engine is busy ({self._startup})")
        return f"prompts prefilled on {self.device} by a copy of the model there ({self._startup})"

    @property
    def prompt_graphs(self) -> int:
        """Decoder-layer graphs captured for prompts, in all lanes (0 where the layers run eagerly)."""
        return sum(len(lane.graphs.graphs) for lane in self._lanes() if lane.graphs is not None)

    @property
    def tower_graphs(self) -> int:
        """Vision-tower graphs captured for prompts' tiles, in all lanes (0 where the tower runs eagerly)."""
        return sum(len(lane.tower.graphs) for lane in self._lanes() if lane.tower is not None)

    def _lanes(self) -> List["_Lane"]:
        return [self.set_aside, self.whole_gpu] if self.beside else [self.elsewhere]

    # ---- the engine's thread --------------------------------------------------------------------

    def add(self, request: ActiveRequest) -> None:
        """Queue an admitted request, with an event behind the decode steps launched so far (its
        cache is copied into its slot after them)."""
        slot_free = None
        if self._copies is not None or self.beside:
            slot_free = torch.cuda.Event()
            slot_free.record(torch.cuda.current_stream(self.engine.device))
        self.requests.append(request)
        self._todo.put((request, slot_free))

    @property
    def ended(self) -> bool:
        """Whether a prefill has ended since the last `take_ended`."""
        return bool(self._done)

    def take_ended(self) -> List[Prefilled]:
        """The prefills that ended since the last call: each request's first token chosen on the
        engine's device, after its cache copy (or its error). Requests that ended meanwhile
        (cancelled) are dropped: the engine ended them itself."""
        ended = []
        while self._done:
            done = self._done.popleft()
            request = done.request
            if done.logits is None and done.error is None and not request.done:
                continue  # skipped, cancelled: the engine ends it itself (it stays in `requests` until then)
            if request in self.requests:
                self.requests.remove(request)
            if request.done:
                continue
            if done.error is not None:
                ended.append(Prefilled(request, error=done.error))
            elif done.logits is not None:
                logits = done.logits
                if done.copied is not None:
                    stream = torch.cuda.current_stream(self.engine.device)
                    stream.wait_event(done.copied)
                    logits.record_stream(stream)  # made on another stream, read on this one
                ended.append(first_token(request, logits, self.histories, self.next_tokens))
        return ended

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=30)

    # ---- the prefill thread ---------------------------------------------------------------------

    def _work(self) -> None:
        """Prefill the queued prompts in turn, each in its lane (`_lane`). Beside the steps, a prompt's
        work is launched before the one before it is handed over (once its copy has run): the prefill
        stream is fed while the thread waits for the interpreter lock or the queue."""
        launched: Optional[_Done] = None  # beside the steps: launched, not handed over yet
        last: Optional[_Lane] = None
        with current(self.device), torch.inference_mode():
            while True:
                if launched is not None and self._todo.empty():
                    self._hand_over(launched)
                    launched = None
                item = self._todo.get()
                if item is None:
                    return
                request, slot_free = item
                lane = self._lane()
                lane.prompts += 1
                if last is not None and lane is not last:  # the prompt row is free once the last prompt's copy ran
                    lane.stream.wait_stream(last.stream)
                last = lane
                try:
                    if request.done or request.handle.cancelled:
                        done = _Done(request)
                    else:
                        with stream_or_none(lane.stream):
                            logits = self._layers(self._embeddings(request.inputs, lane.tower), lane.graphs)
                            done = self._into_slot(request, logits, slot_free)
                except Exception as error:  # this request fails; the thread goes on with the next
                    done = _Done(request, error=error)
                finally:
                    request.inputs = None
                if launched is not None:
                    self._hand_over(launched)
                launched = None
                if self.beside and done.copied is not None:
                    launched = done
                else:
                    self._hand_over(done)

    def _lane(self) -> "_Lane":
        """Where the next prompt runs: on a second device its only lane; beside the steps on the whole
        GPU while no row decodes or the engine is busy (as prefill between the steps prefills whole
        then: serving the queue matters more than the running rows' next tokens), else on the SMs
        set aside."""
        if not self.beside:
            return self.elsewhere
        return self.whole_gpu if self.engine.prefills_whole() else self.set_aside

    def _hand_over(self, done: "_Done") -> None:
        """`done` to the engine (beside the steps once its copy has run, so that no step waits for it)."""
        if self.beside and done.copied is not None:
            done.copied.synchronize()
        self._done.append(done)
        self._on_ended()

    def _embeddings(self, inputs, tower: Optional[TowerGraphs]) -> torch.Tensor:
        """A request's prompt embeddings [1, T, hidden]: its images through the tower (replaying
        `tower`'s graphs where there are some)."""
        if isinstance(inputs, torch.Tensor):  # token ids for a bare decoder
            return self.lm.get_input_embeddings()(inputs.to(self.device, non_blocking=True))
        if tower is None:
            return self.model.prepare_inputs_embeds(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                                    inputs.images_spatial_crop)
        prompt = self.model.image_prompt(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                         inputs.images_spatial_crop)
        return prompt.embeds if prompt.tiles is None else self.model.place_images(prompt, tower(prompt.tiles))

    def _layers(self, embeds: torch.Tensor, graphs: Optional[PromptGraphs]) -> torch.Tensor:
        """The prompt through every decoder layer into the prompt row (replaying `graphs` where there
        are some), once the last copy out of it has been made: its last logits. Between devices the
        thread waits for them, so that the copies it issues next read a finished row; beside the
        steps the copy follows them on the same stream."""
        if self._row_copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._row_copied)
        if graphs is not None:
            logits = GraphLayerPieces(graphs, embeds).advance(len(self.lm.model.layers))
        else:
            logits = LayerPieces(self.lm, embeds, self.prompt.rows(0, 1), self.chunk).advance(len(self.lm.model.layers))
        if self.device.type == "cuda" and not self.beside:
            torch.cuda.current_stream(self.device).synchronize()
        return logits

    def _into_slot(self, request: ActiveRequest, logits: torch.Tensor, slot_free) -> _Done:
        """The prompt's cache from the prompt row into the request's slot, and its `logits` onto the
        engine's device. Between GPUs on the copies' own streams (see the module's docstring): each
        cross-device copy orders itself between the current streams of both devices, which are then
        these two, never the engine's. Skipped if the request has ended (its slot may be another's)."""
        if request.done:
            return _Done(request)
        source = self.prompt.rows(0, 1)
        source.length = request.prompt_len
        target = self.slots.cache.rows(request.slot, 1)
        if self.beside:  # on the prompt's stream, after the steps that may still write the slot
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot_free)
            target.copy_from(source)
            copied = torch.cuda.Event()
            copied.record(stream)
            return _Done(request, logits=logits, copied=copied)
        if self._copies is None:
            target.copy_from(source)
            return _Done(request, logits=logits.to(self.engine.device))
        with torch.cuda.stream(self._landing), torch.cuda.stream(self._copies):
            self._landing.wait_event(slot_free)
            target.copy_from(source)
            landed = logits.to(self.engine.device)
            logits.record_stream(self._copies)  # its memory is not reused before the copy has read it
            copied = torch.cuda.Event()
            copied.record(self._landing)
            self._row_copied = torch.cuda.Event()
            self._row_copied.record(self._copies)
        return _Done(request, logits=landed, copied=copied)

    def _warm_up(self) -> None:
        """A short prompt through every eager layer (the Triton kernels of the prefill device compile
        here, not at the first request)."""
        ids = torch.zeros(1, min(WARM_UP_TOKENS, self.slots.capacity - 1), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._layers(self.lm.get_input_embeddings()(ids), None)
