"""The continuous-batching engine: requests join the running batch after their prefill and leave it
when they end, step by step, instead of waiting for a whole static batch to finish.

    engine = ContinuousEngine(model, processor, max_num_seqs=8)
    engine.start()                                   # the loop thread (or drive `engine.step()`)
    handle = engine.submit(engine.prepare_one(conversation, images), GenerationParams(...))
    handle.result()                                  # or events: on_event(kind, value), handle.events
    handle.cancel()

On CUDA (bfloat16 / float16) the engine is built with its decode steps captured as CUDA graphs
(decode_steps.py: one per row count x cache length, `startup_summary` says how many and how long),
so no request ever waits for a capture; elsewhere the same steps run eagerly.

One iteration (`step`): admit waiting requests while KV slots are free (prompt ids, sampler, text
stream); prefill up to `prefill_chunk` prompt tokens, chunk by chunk, each a batch-1 forward writing
straight into the request's slot row (slots.py; a request's images go through the vision tower at
its first chunk, and a prompt that fits a chunk is prefilled whole); a request whose prompt is in
picks its first token and joins the running rows; then one decode step for all running rows: the
model's `decode_step` with per-row write slots, rope positions and masks, attending over a
256-multiple bucket covering the longest row. Every row then picks its token with its own settings,
rows with equal settings together (row_sampling.py). The model exposes the steps; this module runs
them.

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
from .requests import ActiveRequest, Handle
from .row_sampling import Histories, RowSampler, choose_tokens
from .slots import SlotCache, device_tensor, kv_bucket
from .streaming import TextStream

logger = logging.getLogger(__name__)


class EngineStats:
    """Counters, written by the engine's thread."""

    def __init__(self):
        self.decode_steps = 0
        self.max_running = 0
        self.finished = 0  # requests ended with a result (cancelled ones included)
        self.failed = 0
        self.generated_tokens = 0
        self.compilations_at_start = 0  # torch.compile graphs in the process once the engine was ready


class ContinuousEngine:
    def __init__(self, model, processor, max_num_seqs: int = 8, max_length: Optional[int] = None,
                 prefill_chunk: int = 512, cuda_graphs: Optional[bool] = None):
        """`model`: a DeepseekVLV2ForCausalLM (or a bare DeepseekV2ForCausalLM fed token ids);
        `max_length`: tokens per slot (prompt + answer), default the model's max_position_embeddings;
        `prefill_chunk`: prompt tokens prefilled per engine iteration, between two decode steps;
        `cuda_graphs`: decode steps as CUDA graphs, all captured here (default: on CUDA in bfloat16 or
        float16, where `kernels.dispatch.decode_is_capturable` allows them)."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
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
        # what was captured and compiled before the first request, and how long it took
        self.startup_summary = self.steps.capture_all() if cuda_graphs else "decode steps run eagerly (no CUDA graphs)"
        self.prefill_chunk = prefill_chunk
        self.eos_id = processor.eos_id if processor is not None else self.lm.config.eos_token_id
        self.hidden_ids = [self.eos_id] + ([processor.pad_id] if processor is not None else [])
        self.vocab_size = self.lm.get_input_embeddings().num_embeddings
        self.stats = EngineStats()
        self.stats.compilations_at_start = compilations()
        self._waiting: deque = deque()
        self._prefilling: List[ActiveRequest] = []
        self._running: List[ActiveRequest] = []
        self._pending: List[Chosen] = []  # launched in the last iteration, taken in the next
        self.next_tokens = torch.zeros(max_num_seqs, dtype=torch.long, device=self.device)  # each slot's next input
        self._condition = threading.Condition()
        self._closing = False
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
        handle = Handle(sample, params, on_event)
        with self._condition:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(handle)
            self._condition.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        handle.cancel()
        with self._condition:
            self._condition.notify()

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
        """Stop the loop; waiting and unfinished requests get an error event."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if not self.alive:
            self._fail_all(RuntimeError("the engine is shutting down"))

    def _loop(self) -> None:
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

    # ---- one iteration (the engine's thread) ----------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill up to `prefill_chunk` prompt tokens, decode one token for every running row,
        then take the tokens chosen in the previous iteration (see the module's docstring). A prompt
        that fits in a chunk is prefilled whole, in one forward: when what is left of this
        iteration's budget cannot take the rest of it, it waits for the next iteration's."""
        if (self.lm.device, self.lm.dtype) != (self.device, self.dtype):
            self._fail_all(self._moved_error())
            return
        self._drop_cancelled()
        self._admit()
        launched = []
        budget = self.prefill_chunk
        for request in list(self._prefilling):
            left = request.prompt_len - request.prefilled
            if budget <= 0 or (left > budget and budget < self.prefill_chunk):
                break
            used, first = self._prefill(request, budget)
            budget -= used
            launched += [first] if first is not None else []
        if self._running:
            launched += [chosen for chosen in [self._decode()] if chosen is not None]
        previous, self._pending = self._pending, launched
        for chosen in previous:
            self._take(chosen)

    def _moved_error(self) -> RuntimeError:
        """The KV slots and decode graphs belong to the model's device and dtype when the engine was
        built: a model moved or cast since cannot run here (a clear error for every request, not a
        device mismatch deep in a layer)."""
        return RuntimeError(f"the model was moved or cast to {self.lm.device} / {self.lm.dtype} after this engine "
                            f"was built for {self.device} / {self.dtype}; build a new ContinuousEngine")

    def _drop_cancelled(self) -> None:
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
            self._prefilling.append(request)

    def admit_request(self, handle: Handle, slot: int) -> ActiveRequest:
        """The request's prompt ids, sampler and text stream, in `slot` (its embeddings are made at
        its first prefill chunk, so that admitting many requests at once does not run all their
        images through the vision tower between two decode steps). An exception here fails this
        request alone (a subclass may refuse requests by raising)."""
        sample = handle.sample
        if isinstance(sample, torch.Tensor):  # token ids for a bare decoder
            inputs = input_ids = sample.reshape(1, -1).to(self.device)
        else:
            inputs = self.processor.batchify([sample]).to(self.device, dtype=self.lm.dtype)
            input_ids = inputs.input_ids
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
        return ActiveRequest(handle, slot, input_ids[0], inputs, self.slots.row(slot), sampler, stream)

    def embeddings(self, inputs) -> torch.Tensor:
        """Prompt embeddings [1, T, hidden] (images merged, through the vision tower and projector)."""
        if isinstance(inputs, torch.Tensor):
            return self.lm.get_input_embeddings()(inputs)
        return self.model.prepare_inputs_embeds(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                                inputs.images_spatial_crop)

    def _prefill(self, request: ActiveRequest, budget: int):
        """Prefill up to `budget` more prompt tokens of `request` into its slot; returns how many, and,
        once the whole prompt is in, its first token (chosen on the device, read back later): the
        request then joins the running rows."""
        start = request.prefilled
        end = min(request.prompt_len, start + budget)
        try:
            if request.embeds is None:
                request.embeds, request.inputs = self.embeddings(request.inputs), None
            logits = self.lm(inputs_embeds=request.embeds[:, start:end], past_key_values=request.cache,
                             use_cache=True, logits_to_keep=1).logits[:, -1]
            request.prefilled = request.length = end
            if end < request.prompt_len:
                return end - start, None
            request.embeds = None
            slot = device_tensor([request.slot], self.device)
            token, unusable = choose_tokens(logits, [request.sampler], slot, self.histories)
            self.next_tokens.index_copy_(0, slot, token)
            first = Chosen([request], token, unusable)
        except Exception as error:
            self._remove(request)
            self._fail(request.handle, error)
            return end - start, None
        self._prefilling.remove(request)
        self._running.append(request)
        return end - start, first

    def _decode(self) -> Optional["Chosen"]:
        """Launch one decode step for every running row, over the rows up to the highest one in use
        (padded up to a captured graph's row count). Each row is fed its last chosen token straight
        from the device (`next_tokens`): the step does not wait for the host to read it."""
        running = list(self._running)
        rows = self.steps.rows_for(max(r.slot for r in running) + 1)
        positions, active = [0] * rows, [False] * rows
        for request in self._prefilling:  # a row still prefilling: the dummy write lands where its
            if request.slot < rows:       # next chunk will write (a free row's lands in its slot 0)
                positions[request.slot] = request.prefilled
        for request in running:  # one unpadded prompt per row: rope position == cache slot
            positions[request.slot], active[request.slot] = request.length, True
        kv_len = kv_bucket(max(r.length for r in running) + 1, self.slots.capacity)
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
                self._remove(request)
                self._fail(request.handle, error)
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
                    self._remove(request)
                    self._fail(request.handle, error)
        for request, token, bad in values:
            if request.done:
                continue
            if bad:
                self._remove(request)
                self._fail(request.handle, _unusable(request))
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

    def _fail_all(self, error: Exception, waiting: bool = True) -> None:
        self._pending = []
        for request in self._prefilling + self._running:
            self._remove(request)
            self._fail(request.handle, error)
        if waiting:
            with self._condition:
                handles = list(self._waiting)
                self._waiting.clear()
            for handle in handles:
                self._fail(handle, error)


class Chosen:
    """Tokens chosen on the device for `requests` (row i for requests[i]), copied to the host without
    waiting; `values()` waits for that copy only, not for work launched after it."""

    def __init__(self, requests: List[ActiveRequest], tokens: torch.Tensor, unusable: torch.Tensor):
        self.requests = requests
        both = torch.stack([tokens, unusable.long()])
        self.ready = None
        if both.is_cuda:
            self.host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self.host.copy_(both, non_blocking=True)
            self.ready = torch.cuda.Event()
            # on the stream the copy runs on (its device's), not the calling thread's current device's:
            # the engine's thread of a model on cuda:1 has cuda:0 as its current device
            self.ready.record(torch.cuda.current_stream(both.device))
        else:
            self.host = both

    def values(self):
        """(request, token, unusable) for each row."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, unusable = self.host.tolist()
        return list(zip(self.requests, tokens, unusable))


class _NoText:
    """The text stream of an engine without a tokenizer: no text, no stop strings."""

    text, stopped, first_token_time, end_time = "", False, None, None

    def __init__(self):
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self._prompt_seen = True

    def end(self) -> None:
        self.end_time = time.perf_counter()


def _never_started(handle: Handle) -> ChatResult:
    return ChatResult(text="", token_ids=[], prompt_tokens=len(handle.sample), finish_reason="cancelled")


def _unusable(request: ActiveRequest) -> ValueError:
    return ValueError(f"generation step {len(request.token_ids)}: the scores hold NaN or inf, or mask every token, "
                      "so no next token can be chosen (NaN in the inputs or images? float16 overflow?)")
