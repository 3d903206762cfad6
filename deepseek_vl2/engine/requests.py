"""A request's life in the continuous-batching engine: the caller's `Handle` (events, cancellation,
the result) and the engine-side `ActiveRequest` (its slot, prefill progress, sampler, text stream).

Events, in order, through the handle's `on_event(kind, value)` (or its queue when none is given):
("token", id) and ("text", piece) as they come, then ("done", ChatResult) or ("error", exception).
A ChatResult's finish_reason is "stop" (EOS or a stop string), "length" (max_new_tokens or the
slot's capacity) or "cancelled". An `on_event` that raises cancels its own request and gets no
more events; the exception is kept (`callback_error`) and logged, and the engine goes on.
"""
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ..grounding import parse_grounding
from .chat_engine import ChatResult, Timings
from .params import GenerationParams
from .row_sampling import RowSampler
from .streaming import TextStream

logger = logging.getLogger(__name__)
_ids = itertools.count()


class Handle:
    """What `ContinuousEngine.submit` returns: cancel it, read its events, or wait for its result."""

    def __init__(self, prompt_tokens: int, params: GenerationParams,
                 on_event: Optional[Callable[[str, object], None]] = None):
        self.id = next(_ids)
        self.prompt_tokens = prompt_tokens
        self.inputs = None  # the engine's host tensors for the request, until it is admitted
        self.params = params
        self.events: queue.Queue = queue.Queue()
        self._on_event = on_event
        self.callback_error: Optional[Exception] = None  # what `on_event` raised, if it did
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """End the request at the engine's next step (dropped if still waiting); its slot is freed."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def emit(self, kind: str, value) -> None:
        """Called from the engine's thread."""
        if kind in ("done", "error"):
            self._finished.set()
        if self._on_event is not None:
            if self.callback_error is None:
                self._call_back(kind, value)
        else:
            self.events.put((kind, value))

    def _call_back(self, kind: str, value) -> None:
        try:
            self._on_event(kind, value)
        except Exception as error:  # the caller's code: it must not end the other requests' steps
            self.callback_error = error
            self.cancel()
            logger.exception("request %d: its on_event callback raised; the request is cancelled", self.id)

    def result(self, timeout: Optional[float] = None) -> ChatResult:
        """Wait for the end (events without `on_event` only): the ChatResult, or the error raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            kind, value = self.events.get(timeout=left)
            if kind == "done":
                return value
            if kind == "error":
                raise value


@dataclass
class ActiveRequest:
    """Engine-side state of an admitted request (owned by the engine's thread)."""

    handle: Handle
    slot: int
    prompt_ids: torch.Tensor  # [T] on the host
    inputs: Optional[object]  # host tensors its embeddings are made from (a processed batch, or ids), until then
    sampler: RowSampler
    stream: TextStream
    images: Optional[object] = None  # (ImagePrompt, TowerPieces) while its images go through the tower in pieces
    embeds: Optional[torch.Tensor] = None  # [1, T, hidden] once made, until its prompt is prefilled
    layers: Optional[object] = None  # LayerPieces while its prompt goes through the decoder in pieces
    admitted: float = field(default_factory=time.perf_counter)
    length: int = 0  # tokens in the slot's cache (prompt + generated tokens fed to launched steps)
    token_ids: List[int] = field(default_factory=list)
    done: bool = False  # ended (finished, failed or cancelled): tokens still in flight for it are dropped

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[-1]

    def take(self, token: int, eos_id: int) -> Optional[str]:
        """Record a chosen token, stream it; the finish reason if the request ends with it."""
        self.token_ids.append(token)
        self.handle.emit("token", token)
        self.stream.add([token])
        if token == eos_id or self.stream.stopped:
            return "stop"
        if len(self.token_ids) >= self.sampler.max_new_tokens:
            return "length"
        if self.handle.cancelled:
            return "cancelled"
        return None

    def result(self, finish_reason: str) -> ChatResult:
        self.stream.end()
        first = self.stream.first_token_time or self.stream.end_time
        timings = Timings(prefill_ms=(first - self.admitted) * 1000, decode_tokens=max(len(self.token_ids) - 1, 0),
                          decode_s=self.stream.end_time - first)
        return ChatResult(text=self.stream.text, token_ids=list(self.token_ids), prompt_tokens=self.prompt_len,
                          finish_reason=finish_reason, boxes=parse_grounding(self.stream.text), timings=timings)
