"""Prefill for the continuous engine: a request's images through the vision tower, its prompt into
its KV slot, then its first token. Two ways to run it, picked by the engine for its device:

  InlinePrefill   on the engine's thread, between two decode steps: up to `chunk` prompt tokens
                  per iteration (a prompt that fits a chunk is prefilled whole). CPU.
  StreamPrefill   a worker thread on a CUDA stream of its own prefills each admitted request
                  whole, chunk by chunk, while the engine's thread replays decode steps on a
                  stream of higher priority: the running rows share the GPU with a vision tower
                  and a prefill instead of waiting for them (one of 32 requests' prefills took
                  ~40-70 ms between two decode steps of ~1-3 ms).

Either hands finished prefills back to the engine's thread as `Prefilled` (the request and its
first token, chosen on the device, or the error). The engine frees a slot only once its prefill
has handed it back (`withdraw` says whether a cancelled request can go at once).

Order on the GPU with two streams: the worker's stream waits, before it writes a slot, for the
decode steps launched before the request was admitted (one of them may still write the slot's
previous request's last token); decode steps write the dummy entries of rows not decoding at the
slot's last position, which no prefill writes (continuous.py); the decode stream waits for a
prefill's first token before the row joins a step.
"""
import queue
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

from .requests import ActiveRequest
from .row_sampling import Chosen, choose_tokens
from .slots import device_tensor


@dataclass
class Prefilled:
    """A request whose prefill ended: `first` its first token (a Chosen), or `error`;
    neither for a request cancelled before its prefill started."""

    request: ActiveRequest
    first: Optional[object] = None
    error: Optional[Exception] = None


class PrefillWork:
    """The steps of one request's prefill, on whichever thread and stream runs them."""

    def __init__(self, engine):
        self.model, self.lm = engine.model, engine.lm
        self.histories, self.next_tokens = engine.histories, engine.next_tokens

    def embeddings(self, inputs) -> torch.Tensor:
        """Prompt embeddings [1, T, hidden] (images merged, through the vision tower and projector),
        from host tensors (copied without waiting for the device)."""
        if isinstance(inputs, torch.Tensor):  # token ids for a bare decoder
            return self.lm.get_input_embeddings()(inputs.to(self.lm.device, non_blocking=True))
        return self.model.prepare_inputs_embeds(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                                inputs.images_spatial_crop)

    def forward(self, request: ActiveRequest, tokens: int) -> torch.Tensor:
        """Prefill up to `tokens` more prompt tokens into the request's slot (its images through the
        vision tower at its first chunk); the last position's logits [1, vocab]."""
        if request.embeds is None:
            request.embeds, request.inputs = self.embeddings(request.inputs), None
        start = request.prefilled
        end = min(request.prompt_len, start + tokens)
        logits = self.lm(inputs_embeds=request.embeds[:, start:end], past_key_values=request.cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        request.prefilled = request.length = end
        if end == request.prompt_len:
            request.embeds = None
        return logits

    def first_token(self, request: ActiveRequest, logits: torch.Tensor):
        """The request's first token, chosen on the device and fed to its first decode step from
        there; a Chosen that the engine reads later."""
        slot = device_tensor([request.slot], self.next_tokens.device)
        token, unusable = choose_tokens(logits, [request.sampler], slot, self.histories)
        self.next_tokens.index_copy_(0, slot, token)
        return Chosen([request], token, unusable)


class InlinePrefill:
    """Prefill on the engine's thread, `chunk` prompt tokens per engine iteration."""

    def __init__(self, work: PrefillWork, chunk: int):
        self.work, self.chunk = work, chunk
        self._queue: List[ActiveRequest] = []

    def add(self, request: ActiveRequest) -> None:
        self._queue.append(request)

    def withdraw(self, request: ActiveRequest) -> bool:
        self._queue.remove(request)
        return True

    @property
    def runnable(self) -> bool:
        return bool(self._queue)

    def run(self) -> List[Prefilled]:
        """One iteration's prefill: requests in admission order until `chunk` tokens are spent; a
        prompt that fits a chunk is not split (when what is left of the budget cannot take the rest of
        it, it waits for the next iteration)."""
        done, budget = [], self.chunk
        for request in list(self._queue):
            left = request.prompt_len - request.prefilled
            if budget <= 0 or (left > budget and budget < self.chunk):
                break
            tokens = min(left, budget)
            budget -= tokens
            try:
                logits = self.work.forward(request, tokens)
                if request.prefilled < request.prompt_len:
                    continue
                done.append(Prefilled(request, first=self.work.first_token(request, logits)))
            except Exception as error:
                done.append(Prefilled(request, error=error))
            self._queue.remove(request)
        return done

    def wait(self, timeout: float) -> None:
        """Nothing to wait for: this prefill runs inside `run`."""

    def close(self) -> None:
        self._queue.clear()


class StreamPrefill:
    """Prefill on a worker thread and a CUDA stream of its own (see the module's docstring)."""

    def __init__(self, work: PrefillWork, chunk: int, device: torch.device, on_ready):
        """`on_ready()`: called on the worker's thread when a prefill ends (wakes the engine)."""
        self.work, self.chunk, self.on_ready = work, chunk, on_ready
        self.stream = torch.cuda.Stream(device)  # the default, lowest priority
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: List[ActiveRequest] = []  # added, not yet started by the worker
        self._done: List[Prefilled] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._work, name="engine-prefill", daemon=True)
        self._thread.start()

    def add(self, request: ActiveRequest) -> None:
        """Queue `request` (called on the engine's thread, in its decode stream's order: the worker
        waits for what that stream has launched so far before it writes the slot)."""
        launched = torch.cuda.Event()
        launched.record()
        with self._lock:
            self._waiting.append(request)
        self._todo.put((request, launched))

    def withdraw(self, request: ActiveRequest) -> bool:
        """Take back a request the worker has not started (True); False: it hands it back when done."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                return True
        return False

    @property
    def runnable(self) -> bool:
        return bool(self._done)

    def run(self) -> List[Prefilled]:
        with self._lock:
            done, self._done = self._done, []
            self._ready.clear()
        return done

    def wait(self, timeout: float) -> None:
        """Block until a prefill ends (or `timeout` seconds)."""
        self._ready.wait(timeout)

    def close(self) -> None:
        self._todo.put((None, None))
        self._thread.join(30)

    def _work(self) -> None:
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            while True:
                request, launched = self._todo.get()
                if request is None:
                    return
                with self._lock:
                    if request not in self._waiting:  # withdrawn
                        continue
                    self._waiting.remove(request)
                result = self._prefill(request, launched)
                with self._lock:
                    self._done.append(result)
                    self._ready.set()
                self.on_ready()

    def _prefill(self, request: ActiveRequest, launched: torch.cuda.Event) -> Prefilled:
        self.stream.wait_event(launched)
        try:
            logits = None
            while request.prefilled < request.prompt_len:
                if request.handle.cancelled:
                    return Prefilled(request)
                logits = self.work.forward(request, self.chunk)
            return Prefilled(request, first=self.work.first_token(request, logits))
        except Exception as error:
            return Prefilled(request, error=error)
