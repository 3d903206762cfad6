"""The scheduler: the server's requests go to one continuous-batching engine, which owns the model.

Each request (`Job`) is submitted to a `ContinuousEngine` (engine/continuous.py) running on its own
thread: it joins the running batch as soon as a KV slot is free and its prompt is prefilled (chunk
by chunk, between decode steps), and leaves it when it ends (EOS, one of its stop strings, its
max_tokens, or its client going away), so a short request no longer waits for a long batch. Rows
of one batch may have different sampling settings; a seeded request gives its single-request result.

Each job's text, result or error travels from the engine thread to the asyncio side as events on
the job's asyncio queue (`loop.call_soon_threadsafe`): ("text", piece), then ("done", ChatResult)
or ("error", exception). An exception in one request's prefill fails that request; one in a decode
step fails the requests of that step; the engine goes on with the others.
"""
import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Optional

from ..engine import GenerationParams
from ..engine.continuous import ContinuousEngine
from ..engine.requests import Handle

logger = logging.getLogger(__name__)


class Job:
    """One request: its prepared sample and settings, and the events it produces for the event loop:
    ("text", piece), then ("done", ChatResult) or ("error", exception)."""

    def __init__(self, sample, params: GenerationParams, loop: asyncio.AbstractEventLoop):
        self.sample = sample
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.handle: Optional[Handle] = None

    def cancel(self) -> None:
        """Give up on this job: it is dropped if it still waits, or its row ends at the next step."""
        self.cancelled.set()
        if self.handle is not None:
            self.handle.cancel()

    def emit(self, kind: str, value) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass


@dataclass
class SchedulerStats:
    batches: int = 0  # decode steps of the engine
    requests: int = 0  # requests answered (cancelled ones included)
    failed_batches: int = 0  # requests that failed (the name kept for /health's readers)
    max_batch_size_seen: int = 0  # the most rows one decode step ran
    generated_tokens: int = 0


class BatchScheduler:
    def __init__(self, engine, max_batch_size: int):
        """`engine`: a ContinuousEngine, or a ChatEngine whose model and processor get one with
        `max_batch_size` KV slots."""
        if not isinstance(engine, ContinuousEngine):
            engine = ContinuousEngine(engine.model, engine.processor, max_num_seqs=max_batch_size)
        self.engine = engine
        self.max_batch_size = engine.slots.max_num_seqs
        self._closing = False

    @property
    def stats(self) -> SchedulerStats:
        counts = self.engine.stats
        return SchedulerStats(batches=counts.decode_steps, requests=counts.finished, failed_batches=counts.failed,
                              max_batch_size_seen=counts.max_running, generated_tokens=counts.generated_tokens)

    def start(self) -> None:
        self.engine.start()

    def close(self, timeout_s: float = 30.0) -> None:
        self._closing = True
        self.engine.close(timeout_s)

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
            if kind != "token":  # the Job protocol: text, done, error
                job.emit(kind, value)

        job.handle = self.engine.submit(job.sample, job.params, on_event=forward)
        if job.cancelled.is_set():
            job.handle.cancel()
