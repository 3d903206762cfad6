"""The continuous-batching engine: requests join the running batch after their prefill and leave it
when they end, step by step, instead of waiting for a whole static batch to finish.

    engine = ContinuousEngine(model, processor, max_num_seqs=8)
    engine.start()                                   # the loop thread (or drive `engine.step()`)
    handle = engine.submit(engine.prepare_one(conversation, images), GenerationParams(...))
    handle.result()                                  # or events: on_event(kind, value), handle.events
    handle.cancel()

On CUDA (bfloat16 / float16) the engine is built with its decode steps captured as CUDA graphs
(decode_steps.py: one per row count x cache length) and the decoder's layers over a prompt too
(prompt_graphs.py: one per layer x prompt length bucket); `startup_summary` says how many and how
long. No request ever waits for a capture; elsewhere the same steps run eagerly.

`submit` makes a request's host tensors on the caller's thread (the processor's batch of one, its
images in the model's dtype, in pinned memory for a GPU), so the engine copies them to the device
without waiting for it. One iteration (`step`): admit waiting requests while KV slots are free
(prompt ids, sampler, text stream); with no row decoding, or a busy engine (PIECEWISE_ROWS rows
decoding or WHOLE_PREFILL_QUEUE requests waiting for their prefill), prefill the first whole
(prefill.py); then one decode step for all running rows: the model's `decode_step` with per-row
write slots, rope positions and masks, attending over a 256-multiple bucket covering the longest
row. On a quiet engine the next prompt advances one piece before the step instead (`vision_blocks`
blocks of the vision tower, then a few decoder layers): the running rows wait a few milliseconds
per step instead of a whole prefill once. A request whose prefill ended joins the running rows
with its first token. Every row then picks its token with its own settings, rows with equal
settings together (row_sampling.py). The model exposes the steps; this module runs them.
With `PrefillSettings(device=...)` a second device, or with `PrefillSettings(sms=...)` SMs of this GPU
set aside for it, prefills every prompt on a thread of its own beside the decode steps
(prefill_thread.py); an iteration then only takes the prompts it finished into their slots, and
waits for one when no row decodes.

The chosen tokens stay on the device: the next decode step is fed them from there (`next_tokens`),
and the host takes them one iteration later (`Chosen`, `_take`), after launching that step, so its
work on them (events, streamed text, stop strings, ends) overlaps the device's next step instead of
leaving the device idle. A request that ends therefore runs one step more than it needs; that
token is dropped (it changes nothing the request returns).

A request ends at EOS, at a stop string, after its max_new_tokens (capped by what its prompt leaves
of the slot capacity), or when cancelled; its slot is freed at once. An error in one request's
prefill or sampling fails that request; an error in a decode step fails the rows of that step.
"""
import logging
import threading
import time
from collections import deque
from typing import Callable, List, Optional

import torch

from ..kernels.dispatch import decode_is_capturable
from .chat_engine import ChatResult, PromptTooLongError, prepare_sample
from .decode_steps import DecodeSteps, compilations
from .params import GenerationParams
from .prefill import Prefill, PrefillSettings
from .prefill_thread import PrefillThread, auto_prefill_sms
from .prompt_graphs import PromptGraphs
from .requests import ActiveRequest, Handle
from .row_sampling import Chosen, Histories, RowSampler, choose_tokens
from .slots import SlotCache, device_tensor, kv_bucket
from .streaming import TextStream

logger = logging.getLogger(__name__)


class EngineStats:
    """Counters, written by the engine's thread."""

    def __init__(self):
        self.decode_steps = 0
        self.whole_prefills = 0  # prompts prefilled whole between two decode steps
        self.tower_pieces = 0  # iterations that ran a few vision-tower blocks of a prompt in pieces
        self.layer_pieces = 0  # iterations that ran a few decoder layers of a prompt in pieces
        self.max_running = 0
        self.finished = 0  # requests ended with a result (cancelled ones included)
        self.failed = 0
        self.generated_tokens = 0
        self.compilations_at_start = 0  # torch.compile graphs in the process once the engine was ready


# A prompt is prefilled in pieces between the decode steps only while fewer than PIECEWISE_ROWS rows
# decode and fewer than WHOLE_PREFILL_QUEUE requests wait for their prefill; otherwise it is
# prefilled whole between two steps. Pieces cut the running rows' longest waits (a few ms per step
# instead of a whole prefill), but a prompt in pieces takes longer to its first token, and under
# load that costs throughput, so a busy engine serves the queue first. The queue rule counts the
# prompt in pieces too. Measured on H200s with the pieces of the time (prompt chunks that rode the
# decode steps; benchmarks/RESULTS.md): small, 32 clients, -15 to -20% with pieces always on; over
# HTTP, small, open loop at ~5 requests/s (two machines, so roughly): at 2, inter-token p99 57 ms
# and TTFT p99 399 ms (most bursts brought a second request, and its whole prefill stalled the
# rows); at 4, 18 ms and 665 ms. Without the rule, prompts in pieces could not keep up with 32
# clients and fewer than 16 rows ever decoded: 599 output tok/s against 1314 (same machine).
PIECEWISE_ROWS = 16
WHOLE_PREFILL_QUEUE = 4
IDLE_WAIT_S = 0.05  # the longest wait for a prompt prefilled elsewhere while no row decodes


class ContinuousEngine:
    def __init__(self, model, processor, max_num_seqs: int = 8, max_length: Optional[int] = None,
                 prefill: Optional[PrefillSettings] = None, cuda_graphs: Optional[bool] = None):
        """`model`: a DeepseekVLV2ForCausalLM (or a bare DeepseekV2ForCausalLM fed token ids);
        `max_length`: tokens per slot (prompt + answer), default the model's max_position_embeddings;
        `prefill`: how and where prompts are prefilled: on this device between the decode steps
        (prefill.py), or on a thread of its own beside the steps (prefill_thread.py): with
        `prefill.device` on another device, a second GPU, with a copy of the model made there, while
        this one only decodes, or with `prefill.sms` on that many SMs of this GPU set aside for it
        ("auto": half of them, where CUDA graphs run and green contexts exist, else between the steps);
        `cuda_graphs`: decode steps as CUDA graphs, all captured here (default: on CUDA in bfloat16 or
        float16, where `kernels.dispatch.decode_is_capturable` allows them)."""
        prefill = prefill or PrefillSettings()
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else None
        self.lm = getattr(model, "language", model)
        if self.lm.is_split:
            raise NotImplementedError("the continuous engine runs a decoder on one device; this one is spread over "
                                      "several (load it on one device, or answer with ChatEngine)")
        self.device, self.dtype = self.lm.device, self.lm.dtype
        capacity = max_length or self.lm.config.max_position_embeddings
        self.slots = SlotCache(self.lm, max_num_seqs, capacity)
        self.histories = Histories(max_num_seqs, capacity, self.device)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and decode_is_capturable(self.device, self.lm.dtype)
        self.steps = DecodeSteps(self.lm, self.slots, use_graphs=cuda_graphs)
        sms = prefill.sms
        if sms == "auto":  # beside the steps where SMs can be set aside and graphs run (else between them)
            sms = auto_prefill_sms(self.device) if cuda_graphs and prefill.device is None else None
        here = prefill.device is None and sms is None  # prompts in pieces between the steps
        prompt_graphs = PromptGraphs(self.lm, self.slots.prompt) if cuda_graphs and here else None
        # what was captured and compiled before the first request, and how long it took
        self.startup_summary = (f"{self.steps.capture_all()}" if cuda_graphs
                                else "decode steps run eagerly (no CUDA graphs)")
        self.eos_id = processor.eos_id if processor is not None else self.lm.config.eos_token_id
        self.hidden_ids = [self.eos_id] + ([processor.pad_id] if processor is not None else [])
        self.vocab_size = self.lm.get_input_embeddings().num_embeddings
        self.stats = EngineStats()
        self.stats.compilations_at_start = compilations()
        self._waiting: deque = deque()
        self._running: List[ActiveRequest] = []
        self._pending: List[Chosen] = []  # launched in the last iteration, taken in the next
        self.next_tokens = torch.zeros(max_num_seqs, dtype=torch.long, device=self.device)  # each slot's next input
        self._condition = threading.Condition()
        self._closing = False
        self.after_step: Optional[Callable[[], None]] = None  # called on the loop's thread after each iteration
        if here:
            self.prefill = Prefill(self, prefill, prompt_graphs)
            self.startup_summary += (f"; {prompt_graphs.capture_all()}" if prompt_graphs is not None
                                     else "; prompts prefilled eagerly")
        else:
            self.prefill = PrefillThread(self, prefill.device or self.device, prefill.chunk, use_graphs=cuda_graphs,
                                         on_ended=self._wake, sms=sms)
            self.startup_summary += f"; {self.prefill.summary()}"
        self._prefilling = self.prefill.requests  # admitted, not decoding yet
        self._thread: Optional[threading.Thread] = None

    # ---- the caller's side (any thread) ---------------------------------------------------------

    def prepare_one(self, conversation: list, images: list):
        """One processed sample for `submit` (PromptTooLongError when it does not fit a slot)."""
        return prepare_sample(self.processor, conversation, images, self.slots.capacity)

    def submit(self, sample, params: GenerationParams,
               on_event: Optional[Callable[[str, object], None]] = None) -> Handle:
        """Queue a request: `sample` from `prepare_one` (or a 1-D tensor of token ids for a bare
        decoder). Its events go to `on_event(kind, value)`, called on the engine's thread, or to
        `handle.events`."""
        return self.submit_inputs(self.host_inputs(sample), len(sample), params, on_event)

    def submit_inputs(self, inputs, prompt_tokens: int, params: GenerationParams,
                      on_event: Optional[Callable[[str, object], None]] = None) -> Handle:
        """`submit` for host tensors made elsewhere (`host_inputs`' batch of one, or token ids [1, T]),
        `prompt_tokens` long: what the engine process of the server receives."""
        handle = Handle(prompt_tokens, params, on_event)
        handle.inputs = inputs
        with self._condition:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(handle)
            self._condition.notify()
        return handle

    def host_inputs(self, sample):
        """What the engine copies to the device for `sample`: token ids [1, T], or the processor's
        batch of one with its images in the model's dtype; pinned for a GPU (an asynchronous copy)."""
        if isinstance(sample, torch.Tensor):
            inputs = sample.reshape(1, -1)
            return inputs.pin_memory() if self.device.type == "cuda" else inputs
        batch = batch_of_one(self.processor, sample, self.dtype)
        if self.device.type == "cuda":
            for name in ("input_ids", "images"):
                setattr(batch, name, getattr(batch, name).pin_memory())
        return batch

    def cancel(self, handle: Handle) -> None:
        handle.cancel()
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._pending)

    def start(self) -> None:
        """Run `step` on a background thread until `close`."""
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; waiting and unfinished requests get an error event (from the loop's thread
        as it ends, which may be after `timeout_s` when a step is running)."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is None:  # driven by `step` on the caller's thread
            self._shut_down()
        else:
            self._thread.join(timeout_s)

    def _shut_down(self) -> None:
        self.prefill.close()
        self._fail_all(RuntimeError("the engine is shutting down"))

    def _loop(self) -> None:
        try:
            while True:
                with self._condition:
                    while not self._closing and not self.has_work():
                        self._condition.wait()
                    if self._closing:
                        return
                try:
                    self.step()
                except Exception as error:  # keep serving: the requests in flight fail, later ones go on
                    logger.exception("engine step failed")
                    self._fail_all(error, waiting=False)
                if self.after_step is not None:
                    self.after_step()
        finally:
            self._shut_down()

    # ---- one iteration (the engine's thread) ----------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit; advance the prefills (here, or take those another device finished); then one decode
        step for every running row; then take the tokens chosen in the previous iteration (see the
        module's docstring)."""
        if (self.lm.device, self.lm.dtype) != (self.device, self.dtype):
            self._fail_all(self._moved_error())
            return
        self._drop_cancelled()
        self._admit()
        if isinstance(self.prefill, PrefillThread):
            self._wait_for_prefill_thread()
            launched = self._join_prefilled()
        else:
            launched = self._prefill_here()
        if self._running:
            chosen = self._decode()
            launched += [chosen] if chosen is not None else []
        previous, self._pending = self._pending, launched
        for chosen in previous:
            self._take(chosen)

    def _wait_for_prefill_thread(self) -> None:
        """With no row decoding and prompts prefilling on the prefill thread, wait until one ends, a
        request arrives that a free slot can take, or the engine closes (at most IDLE_WAIT_S),
        instead of stepping through empty iterations."""
        if self._running or not self._prefilling or self.prefill.ended:
            return
        with self._condition:
            self._condition.wait_for(lambda: self.prefill.ended or (self._waiting and self.slots.free_count)
                                     or self._closing, IDLE_WAIT_S)

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify()

    def busy(self) -> bool:
        """PIECEWISE_ROWS rows decoding, or WHOLE_PREFILL_QUEUE requests waiting for their prefill."""
        return len(self._running) >= PIECEWISE_ROWS or len(self._prefilling) + len(self._waiting) >= WHOLE_PREFILL_QUEUE

    def prefills_whole(self) -> bool:
        """Whether a prompt is prefilled on the whole GPU now (no row decodes, or the engine is busy),
        or else in pieces between the steps (or on SMs set aside beside them). Read from the prefill
        thread too."""
        return not self._running or self.busy()

    def _prefill_here(self) -> List[Chosen]:
        """With no row decoding or a busy engine, prefill the first waiting prompt whole; on a quiet
        engine with rows decoding, run a piece of it. The first tokens of the prompts that ended."""
        busy = self.busy()
        launched = []
        if self.prefills_whole():
            self.stats.whole_prefills += bool(self._prefilling)
            self.prefill.whole()
            launched += self._join_prefilled()
        if self._running and not busy:
            self.prefill.piece()
            launched += self._join_prefilled()  # a prefill may end in this piece
        return launched

    def _join_prefilled(self) -> List[Chosen]:
        """Requests whose prefill ended join the running rows (their first tokens are in flight);
        failed ones end."""
        launched = []
        for prefilled in self.prefill.take_ended():
            request = prefilled.request
            if prefilled.error is not None:
                self._abort(request, prefilled.error)
                continue
            self._running.append(request)
            launched.append(prefilled.first)
        return launched

    def _moved_error(self) -> RuntimeError:
        """The KV slots and decode graphs belong to the model's device and dtype when the engine was
        built: a model moved or cast since cannot run here (a clear error for every request, not a
        device mismatch deep in a layer)."""
        return RuntimeError(f"the model was moved or cast to {self.lm.device} / {self.lm.dtype} after this engine "
                            f"was built for {self.device} / {self.dtype}; build a new ContinuousEngine")

    def end_cancelled(self) -> None:
        """End the cancelled requests now, outside a step, and forget the tokens in flight for them: for
        a caller whose loop over `step` was interrupted, after cancelling its requests, so that no
        work of theirs is left for the next caller."""
        self._drop_cancelled()
        self._pending = [chosen for chosen in self._pending if not all(r.done for r in chosen.requests)]

    def _drop_cancelled(self) -> None:
        """Waiting cancelled requests are dropped; admitted ones end "cancelled" and free their slots."""
        with self._condition:
            cancelled = [h for h in self._waiting if h.cancelled]
            for handle in cancelled:
                self._waiting.remove(handle)
        for handle in cancelled:
            self.stats.finished += 1
            handle.emit("done", _never_started(handle))
        for request in [r for r in self._prefilling + self._running if r.handle.cancelled]:
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self.slots.free_count:
            with self._condition:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            slot = self.slots.allocate()
            try:
                request = self.admit_request(handle, slot)
            except Exception as error:
                self.slots.free(slot)
                self._fail(handle, error)
                continue
            self.prefill.add(request)

    def admit_request(self, handle: Handle, slot: int) -> ActiveRequest:
        """The request's prompt ids, sampler and text stream, in `slot` (its embeddings are made at
        its first prefill chunk, so that admitting many requests at once does not run all their
        images through the vision tower between two decode steps). An exception here fails this
        request alone (a subclass may refuse requests by raising)."""
        inputs, handle.inputs = handle.inputs, None
        input_ids = inputs if isinstance(inputs, torch.Tensor) else inputs.input_ids  # [1, T] on the host
        T = input_ids.shape[1]
        capacity = self.slots.capacity
        if T >= capacity:
            raise PromptTooLongError(f"the prompt is {T} tokens; a slot holds {capacity} (prompt and answer)")
        max_new = min(handle.params.max_new_tokens, capacity - T)
        sampler = RowSampler(handle.params, T, max_new, self.eos_id, self.vocab_size, self.device)
        self.histories.start(slot, input_ids[0])
        stream = TextStream(self.tokenizer, self.hidden_ids, handle.params.stop,
                            lambda piece: handle.emit("text", piece)) if self.tokenizer is not None else _NoText()
        stream.put(input_ids[0])  # the first put is the prompt
        return ActiveRequest(handle, slot, input_ids[0], inputs, sampler, stream)

    def _decode(self) -> Optional["Chosen"]:
        """Launch one decode step for every running row, over the rows up to the highest one in use
        (padded up to a captured graph's row count). Each row is fed its last chosen token straight
        from the device (`next_tokens`): the step does not wait for the host to read it."""
        running = list(self._running)
        rows = self.steps.rows_for(max(r.slot for r in running) + 1)
        # a row not decoding (free, or prefilling) writes its dummy entry at its last position, which
        # no prompt reaches (it leaves room for a token) and a decoding row writes before reading
        positions, active = [self.slots.capacity - 1] * rows, [False] * rows
        for request in running:  # one unpadded prompt per row: rope position == cache slot
            positions[request.slot], active[request.slot] = request.length, True
        kv_len = kv_bucket(max(r.length + 1 for r in running), self.slots.capacity)
        slots = [r.slot for r in running]
        try:
            self.steps.load(self.next_tokens[:rows], positions, active)
            logits = self.steps.run(rows, kv_len)
            index = device_tensor(slots, self.device)
            if slots != list(range(rows)):  # logits come by slot; the rows in `running` order
                logits = logits.index_select(0, index)
            tokens, unusable = choose_tokens(logits, [r.sampler for r in running], index, self.histories)
            self.next_tokens.index_copy_(0, index, tokens)
            chosen = Chosen(running, tokens, unusable)
        except Exception as error:
            for request in running:
                self._abort(request, error)
            return None
        for request in running:
            request.length += 1
        self.stats.decode_steps += 1
        self.stats.max_running = max(self.stats.max_running, len(running))
        return chosen

    def _take(self, chosen: "Chosen") -> None:
        """Hand the tokens of an earlier launch to their requests (a request that ended since is
        skipped: its row ran one step more than it needed, and that token is dropped)."""
        try:
            values = chosen.values()
        except Exception as error:
            values = []
            for request in chosen.requests:
                if not request.done:
                    self._abort(request, error)
        for request, token, bad in values:
            if request.done:
                continue
            if bad:
                self._abort(request, _unusable(request))
                continue
            reason = request.take(token, self.eos_id)
            if reason is not None:
                self._finish(request, reason)

    # ---- endings ----------------------------------------------------------------------------------

    def _remove(self, request: ActiveRequest) -> None:
        request.done = True
        for group in (self._prefilling, self._running):
            if request in group:
                group.remove(request)
        self.slots.free(request.slot)

    def _finish(self, request: ActiveRequest, reason: str) -> None:
        self._remove(request)
        self.stats.finished += 1
        self.stats.generated_tokens += len(request.token_ids)
        request.handle.emit("done", request.result(reason))

    def _fail(self, handle: Handle, error: Exception) -> None:
        self.stats.failed += 1
        handle.emit("error", error)

    def _abort(self, request: ActiveRequest, error: Exception) -> None:
        """End an admitted request with `error`. Its slot is cleared first: what a failed request
        wrote there (NaN, say) would reach the slot's next request through the positions its mask
        hides, as 0 * NaN is NaN."""
        self.slots.clear(request.slot)
        self._remove(request)
        self._fail(request.handle, error)

    def _fail_all(self, error: Exception, waiting: bool = True) -> None:
        self._pending = []
        for request in self._prefilling + self._running:
            self._abort(request, error)
        if waiting:
            with self._condition:
                handles = list(self._waiting)
                self._waiting.clear()
            for handle in handles:
                self._fail(handle, error)


def batch_of_one(processor, sample, dtype: torch.dtype):
    """The processor's batch of `sample` alone, its images in `dtype`: what the engine copies to its device."""
    batch = processor.batchify([sample])
    batch.images = batch.images.to(dtype)
    return batch


class _NoText:
    """The text stream of an engine without a tokenizer: no text, no stop strings."""

    text, stopped, first_token_time, end_time = "", False, None, None

    def put(self, value) -> None:  # the prompt: nothing to show
        pass

    def add(self, new_ids) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        self.end_time = time.perf_counter()


def _never_started(handle: Handle) -> ChatResult:
    return ChatResult(text="", token_ids=[], prompt_tokens=handle.prompt_tokens, finish_reason="cancelled")


def _unusable(request: ActiveRequest) -> ValueError:
    return ValueError(f"generation step {len(request.token_ids)}: the scores hold NaN or inf, or mask every token, "
                      "so no next token can be chosen (NaN in the inputs or images? float16 overflow?)")
