"""The batch scheduler: one thread owns the model and answers waiting requests in batches.

Requests (`Job`s) wait in a queue. Whenever the model is free, the scheduler takes the oldest waiting
job and every other waiting job with the same sampling settings (greedy, or equal temperature, top_p
and repetition_penalty) whose answers fit the context together with it, up to `max_batch_size`,
and runs them as one left-padded batch through `ChatEngine.chat_batch`. A seeded job runs alone,
so that its seed gives the single-request result.
Within a batch every row ends on its own (EOS, its stop strings, its max_tokens, or its client going
away). Jobs that arrive while a batch decodes wait for the next batch: the engine keeps one cache
length for the whole batch, so a request cannot join mid-decode.

Each job's text, result or error travels from the scheduler thread to the asyncio side as events
on the job's asyncio queue (`loop.call_soon_threadsafe`). An exception in a batch fails that batch's
jobs; the scheduler goes on with the next batch.
"""
import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from ..engine import BatchRow, ChatResult, GenerationParams, sampling_key

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

    def cancel(self) -> None:
        """Give up on this job: it is dropped if it still waits, or its row ends at the next step."""
        self.cancelled.set()

    def emit(self, kind: str, value) -> None:
        """Called from the scheduler thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def row(self) -> BatchRow:
        return BatchRow(self.sample, self.params, on_text=lambda piece: self.emit("text", piece),
                        is_cancelled=self.cancelled.is_set)


@dataclass
class SchedulerStats:
    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    max_batch_size_seen: int = 0
    generated_tokens: int = 0


class BatchScheduler:
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
