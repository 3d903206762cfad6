"""The schedulers: one thread owns the model and answers the server's requests (`Job`s).

The rule (`uses_continuous_engine`): the continuous-batching engine (`ContinuousScheduler`; on CUDA
its decode steps are CUDA graphs captured at start-up) serves every model on one device; a model
spread over several GPUs is served by static batching (`BatchScheduler`), whose `generate` runs
split models. `--scheduler static|continuous` overrides the rule.

Static batching (`BatchScheduler`): whenever the model is free, the scheduler takes the oldest waiting
job and every other waiting job with the same sampling settings (greedy, or equal temperature, top_p
and repetition_penalty) whose answers fit the context together with it, up to `max_batch_size`, and
runs them as one batch through `ChatEngine.chat_batch` (for a split model one left-padded `generate`
batch, whose rules the grouping follows). A seeded job runs alone, so that its seed gives the
single-request result. Within a batch every row ends on its own; jobs that arrive
while a batch decodes wait for the next batch (the batch has one cache length). An exception in a
batch fails that batch's jobs; the scheduler goes on with the next batch.

Continuous batching (`ContinuousScheduler`): each job is submitted to a `ContinuousEngine`
(engine/continuous.py) running on its own thread: it joins the running batch as soon as a KV slot is
free and its prompt is prefilled (in pieces, between decode steps), and leaves it when it ends,
so a short request does not wait for a long one. Rows may have different sampling settings; a seeded
request gives its single-request result. An exception in one request's prefill fails that request;
one in a decode step fails the requests of that step.

Both keep the same protocol: each job's events travel from the model's thread to the asyncio side on
the job's asyncio queue: ("text", piece), then ("done", ChatResult) or ("error", exception). They
cross through the loop's `EventRelay`: one wake-up of the loop for a burst (every row's text of one
decode step) instead of one per event. `Job.cancel` drops a waiting job or ends its row at the next
step; `stats`, `alive` and `waiting` feed /health. `engine_process.EngineProcess` keeps the same
protocol for a continuous engine in a process of its own (`--engine-process`).
"""
import asyncio
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..engine import BatchRow, ChatResult, GenerationParams, sampling_key
from ..engine.continuous import ContinuousEngine
from ..engine.decode_steps import compilations
from ..engine.prefill import PrefillSettings
from ..engine.requests import Handle

logger = logging.getLogger(__name__)

SCHEDULERS = ("auto", "static", "continuous")


class EventRelay:
    """Hands events from other threads to one asyncio loop: `put` appends to a list and wakes the
    loop (`call_soon_threadsafe`, a write to its self-pipe) only when no wake-up is pending yet; the
    loop then delivers everything queued meanwhile, in order. A decode step's events for all its rows
    therefore cost one wake-up: each wake-up is a system call on the engine's thread and hands the
    interpreter lock to the event loop, both of which delay the engine's next step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # relay_for's table holds relays by weak loop keys
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, deque(), False
        for queue, event in pending:
            queue.put_nowait(event)


_relays: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventRelay]" = weakref.WeakKeyDictionary()
_relays_lock = threading.Lock()


def relay_for(loop: asyncio.AbstractEventLoop) -> EventRelay:
    """The one EventRelay of `loop`."""
    with _relays_lock:
        relay = _relays.get(loop)
        if relay is None:
            relay = _relays[loop] = EventRelay(loop)
        return relay


class Job:
    """One request: its prepared sample and settings, and the events it produces for the event loop:
    ("text", piece) when it `streams`, then ("done", ChatResult) or ("error", exception); or
    ("expired", None) from its deadline timer (`expire_at`)."""

    def __init__(self, sample, params: GenerationParams, loop: asyncio.AbstractEventLoop, streams: bool = True):
        self.sample = sample
        self.params = params
        self.loop = loop
        self.streams = streams  # a non-streamed answer's text pieces would wake the loop for nothing
        self.relay = relay_for(loop) if loop is not None else None
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.handle: Optional[Handle] = None  # set once submitted to a ContinuousEngine
        self._expiry: Optional[asyncio.TimerHandle] = None

    def expire_at(self, deadline: float) -> None:
        """On the loop: at loop time `deadline` the job is cancelled and ("expired", None) is queued.
        One timer for the whole answer, rather than a timeout around each wait for an event."""
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self.cancel()
        self.events.put_nowait(("expired", None))

    def cancel(self) -> None:
        """Give up on this job: it is dropped if it still waits, or its row ends at the next step.
        Its deadline timer is stopped (call this on the loop's thread once a deadline is set)."""
        self.cancelled.set()
        if self.handle is not None:
            self.handle.cancel()
        if self._expiry is not None:
            self._expiry.cancel()

    def emit(self, kind: str, value) -> None:
        """Called from the scheduler's (or engine's) thread."""
        if kind == "text" and not self.streams:
            return
        self.relay.put(self.events, (kind, value))

    def row(self) -> BatchRow:
        return BatchRow(self.sample, self.params, on_text=(lambda piece: self.emit("text", piece)) if self.streams
                        else None, is_cancelled=self.cancelled.is_set)


@dataclass
class SchedulerStats:
    batches: int = 0  # static: batches run; continuous: decode steps
    requests: int = 0  # requests answered (continuous: cancelled ones included)
    failed_batches: int = 0  # static: batches that failed; continuous: requests that failed
    max_batch_size_seen: int = 0  # the most rows one batch (decode step) ran
    generated_tokens: int = 0
    decode_graphs: int = 0  # continuous on CUDA: decode-step graphs captured at start-up
    prompt_graphs: int = 0  # continuous on CUDA: prompt-layer graphs captured at start-up
    tower_graphs: int = 0  # continuous on CUDA, prompts on a thread of their own: vision-tower graphs (start-up)
    steps_without_graph: int = 0  # continuous on CUDA: decode steps that found no captured graph (0)
    compilations_after_start: int = 0  # continuous: torch.compile graphs compiled since start-up (0)
    slots_in_use: int = 0  # continuous: KV slots held by requests (prefilling or decoding)
    whole_prefills: int = 0  # continuous: prompts prefilled whole between two decode steps
    tower_pieces: int = 0  # continuous: iterations that ran a few vision-tower blocks (prefill in pieces)
    layer_pieces: int = 0  # continuous: iterations that ran a few decoder layers (prefill in pieces)


def uses_continuous_engine(engine, scheduler: str = "auto") -> bool:
    """The rule: "auto" serves with the continuous engine unless the model is spread over several
    devices (the engine decodes on one), which static batching serves; "static" / "continuous" force one."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler != "auto":
        return scheduler == "continuous"
    return isinstance(engine, ContinuousEngine) or not getattr(engine.model, "language", engine.model).is_split


def create_scheduler(engine, max_batch_size: int, context_length: Optional[int] = None, scheduler: str = "auto",
                     max_num_seqs: Optional[int] = None, prefill: Optional[PrefillSettings] = None, batch_engine=None,
                     on_error: Optional[Callable[[BaseException], None]] = None):
    """The server's scheduler for `engine` by the rule of `uses_continuous_engine`. Static batching
    runs `batch_engine` (default `engine`; the app passes its device guard) with `max_batch_size` and
    `context_length`; the continuous engine gets `max_num_seqs` rows (default `max_batch_size`),
    its `prefill` settings, and reports failed requests' errors to `on_error`."""
    if uses_continuous_engine(engine, scheduler):
        return ContinuousScheduler(engine, max_num_seqs or max_batch_size, prefill, on_error=on_error)
    if isinstance(engine, ContinuousEngine):
        raise ValueError("static batching needs a ChatEngine (chat_batch), not a ContinuousEngine")
    return BatchScheduler(batch_engine or engine, max_batch_size, context_length=context_length)


class BatchScheduler:
    """Static batching (see the module's docstring); `engine` has `chat_batch` (a ChatEngine)."""

    def __init__(self, engine, max_batch_size: int, context_length: Optional[int] = None):
        """`context_length`: jobs share a batch only while the longest prompt plus the largest
        max_new_tokens fits it (a left-padded batch has one length), so no job's answer is cut by
        another job's prompt; None: no such check."""
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.stats = SchedulerStats()
        self._waiting: List[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._condition:
            self._closing = True
            for job in self._waiting:
                job.emit("error", RuntimeError("the server is shutting down"))
            self._waiting.clear()
            self._condition.notify()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._condition.notify()

    def _next_batch(self) -> Optional[List[Job]]:
        """The oldest waiting job and the compatible jobs behind it; None once closing."""
        with self._condition:
            while True:
                self._waiting = [job for job in self._waiting if not job.cancelled.is_set()]
                if self._closing:
                    return None
                if self._waiting:
                    break
                self._condition.wait()
            head = self._waiting[0]
            if head.params.seed is not None:
                batch = [head]
            else:
                key = sampling_key(head.params)
                batch = [head]  # the oldest job goes first, whatever its size
                for job in self._waiting[1:]:
                    if (len(batch) < self.max_batch_size and job.params.seed is None
                            and sampling_key(job.params) == key and self._fits(batch + [job])):
                        batch.append(job)
            self._waiting = [job for job in self._waiting if job not in batch]
            return batch

    def _fits(self, jobs: List[Job]) -> bool:
        if self.context_length is None:
            return True
        longest = max(len(job.sample) for job in jobs)
        return longest + max(job.params.max_new_tokens for job in jobs) <= self.context_length

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                results: List[ChatResult] = self.engine.chat_batch([job.row() for job in batch])
            except Exception as error:  # fail this batch's requests, keep serving the next ones
                logger.exception("a batch of %d request(s) failed", len(batch))
                self.stats.failed_batches += 1
                for job in batch:
                    job.emit("error", error)
                continue
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(batch))
            self.stats.generated_tokens += sum(len(result.token_ids) for result in results)
            logger.info("batch of %d answered in %.2f s", len(batch), time.perf_counter() - started)
            for job, result in zip(batch, results):
                job.emit("done", result)


def threads_beside_event_loop(threads: int) -> int:
    """torch's intra-op threads for a CPU engine serving beside an event loop: one core fewer than
    the process may use, when `threads` takes them all. The engine's parallel regions wait for every
    thread of the pool, so each time the event loop wakes on a core the pool needs, a decode step
    stalls. On 2 cores, a short request decoding beside a long one took 2.9 times its time alone
    with 2 threads and 1.2 times with 1 (tiny fixture, benchmarks/RESULTS.md fifteenth session)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 1 if threads >= cores > 1 else threads


def continuous_stats(engine: ContinuousEngine) -> SchedulerStats:
    """/health's counters of a continuous engine (read in the engine's own process)."""
    counts, steps = engine.stats, engine.steps
    return SchedulerStats(batches=counts.decode_steps, requests=counts.finished, failed_batches=counts.failed,
                          max_batch_size_seen=counts.max_running, generated_tokens=counts.generated_tokens,
                          decode_graphs=len(steps.graphs), steps_without_graph=steps.eager_steps,
                          prompt_graphs=engine.prefill.prompt_graphs, tower_graphs=engine.prefill.tower_graphs,
                          compilations_after_start=compilations() - counts.compilations_at_start,
                          slots_in_use=len(engine.slots.used), whole_prefills=counts.whole_prefills,
                          tower_pieces=counts.tower_pieces, layer_pieces=counts.layer_pieces)


class ContinuousScheduler:
    def __init__(self, engine, max_num_seqs: int = 8, prefill: Optional[PrefillSettings] = None,
                 on_error: Optional[Callable[[BaseException], None]] = None):
        """`engine`: a ContinuousEngine, or a ChatEngine whose model and processor get one with
        `max_num_seqs` KV slots and `prefill` settings. `on_error(exception)`: called on the engine's
        thread for each failed request (the app's device guard)."""
        if not isinstance(engine, ContinuousEngine):
            engine = ContinuousEngine(engine.model, engine.processor, max_num_seqs=max_num_seqs, prefill=prefill)
        self.engine = engine
        logger.info("continuous engine ready: %d KV slots of %d tokens; %s", engine.slots.max_num_seqs,
                    engine.slots.capacity, engine.startup_summary)
        self.max_batch_size = engine.slots.max_num_seqs
        self.on_error = on_error
        self._closing = False
        self._torch_threads: Optional[int] = None  # torch's intra-op threads before start (a CPU engine)

    @property
    def stats(self) -> SchedulerStats:
        return continuous_stats(self.engine)

    def start(self) -> None:
        if self.engine.device.type == "cpu":
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads_beside_event_loop(self._torch_threads))
        self.engine.start()

    def close(self, timeout_s: float = 30.0) -> None:
        self._closing = True
        self.engine.close(timeout_s)
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    def submit(self, job: Job) -> None:
        if self._closing:
            raise RuntimeError("the server is shutting down")

        def forward(kind, value):
            if kind == "error" and self.on_error is not None:
                self.on_error(value)
            if kind != "token":  # the Job protocol: text, done, error
                job.emit(kind, value)

        job.handle = self.engine.submit(job.sample, job.params, on_event=forward)
        job.sample = None  # the engine holds what it needs of it (its own host tensors)
        if job.cancelled.is_set():
            job.handle.cancel()
