"""One engine over a stream of rows: rows are prepared by the image workers and submitted to a started
ContinuousEngine as they come, with up to `in_flight` rows between being taken from the stream and
being answered (default twice the engine's slots: a full batch decoding and as many prepared or being
prepared behind it, so a slot that frees is refilled at the next step, and memory stays bounded).

A row is taken from the stream only when there is room for it: where several engines take rows from
one shared queue (processes.py), each takes work as it frees up.

`run` may be called from several threads at once (a Ray actor running two batches): they share the
engine, the workers and the in-flight bound.
"""
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..engine import ChatResult, GenerationParams
from .driver import EngineFailed
from .prepare import Prepared, Preparer
from .rows import Row


@dataclass
class RunnerStats:
    rows: int = 0  # answered or failed
    errors: int = 0
    tokens: int = 0  # generated
    first_submit: Optional[float] = None  # perf_counter
    last_result: Optional[float] = None

    @property
    def busy_s(self) -> float:
        """From the first row submitted to the last answer."""
        return (self.last_result - self.first_submit) if self.first_submit and self.last_result else 0.0


def answer_record(row: Row, result: ChatResult) -> dict:
    """The output record of an answered row (grounding boxes only when the answer has some)."""
    record = {"id": row.id, "text": result.text, "finish_reason": result.finish_reason,
              "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)}
    if result.boxes:
        record["boxes"] = [{"label": box.label, "box": list(box.box)} for box in result.boxes]
    return record


class EngineRunner:
    def __init__(self, engine, defaults: GenerationParams, in_flight: Optional[int] = None,
                 image_workers: Optional[int] = None):
        """`engine`: a ContinuousEngine (started here); `defaults`: the run's generation settings."""
        self.engine = engine
        self.in_flight = in_flight or 2 * engine.slots.max_num_seqs
        if self.in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {self.in_flight}")
        self._room = threading.Semaphore(self.in_flight)
        self.preparer = Preparer(engine, defaults, image_workers)
        self.stats = RunnerStats()
        self._stats_lock = threading.Lock()
        if not engine.alive:
            engine.start()

    def run(self, rows: Iterable[Row], emit: Callable[[Row, dict], None]) -> None:
        """Answer every row of `rows`; `emit(row, record)` is called on this thread for each, in the
        order they finish. A row the engine fails for a reason of its own (a ValueError: its scores
        unusable, its prompt too long) gets an error record; any other engine error (the device's:
        out of memory, a CUDA error) gives no record, and once the rows in flight are out,
        EngineFailed says how many rows have none (after `in_flight` such failures in a row no more
        rows are taken). An exception from `rows` is raised here too."""
        results: queue.Queue = queue.Queue()  # (row, record or None, engine failure or None); None: fed
        taken = [0]
        feeder_error = []
        fed, abort = threading.Event(), threading.Event()

        def feed():
            try:
                iterator = iter(rows)
                while True:
                    self._room.acquire()
                    try:
                        row = None if abort.is_set() else next(iterator)
                    except StopIteration:
                        row = None
                    if row is None:
                        self._room.release()
                        return
                    taken[0] += 1
                    self.preparer.submit(row).add_done_callback(lambda future: self._submit(future.result(), results))
            except BaseException as error:  # noqa: B036  (re-raised on the caller's thread)
                feeder_error.append(error)
            finally:
                fed.set()
                results.put(None)  # wake the caller to see that feeding is over

        threading.Thread(target=feed, name="batch-feeder", daemon=True).start()
        emitted, failures, streak = 0, [], 0
        while not (fed.is_set() and emitted == taken[0]):
            item = results.get()
            if item is None:
                continue
            row, record, failure = item
            self._room.release()
            emitted += 1
            if failure is not None:
                failures.append((row, failure))
                streak += 1
                if streak >= self.in_flight:
                    abort.set()
                continue
            streak = 0
            self._count(record)
            emit(row, record)
        if feeder_error:
            raise feeder_error[0]
        if failures:
            row, error = failures[0]
            raise EngineFailed(f"{len(failures)} row(s) failed in the engine and have no record (a rerun answers "
                               f"them){'; it stopped taking rows' if abort.is_set() else ''}; the first, "
                               f"{row.id!r}: {type(error).__name__}: {error}")

    def _submit(self, prepared: Prepared, results: queue.Queue) -> None:
        """On an image worker's thread: the prepared row into the engine, or its error out."""
        row = prepared.row
        if prepared.error is not None:
            results.put((row, {"id": row.id, "error": prepared.error}, None))
            return

        def on_event(kind, value):  # on the engine's thread
            if kind == "done":
                results.put((row, answer_record(row, value), None))
            elif kind == "error" and isinstance(value, ValueError):
                results.put((row, {"id": row.id, "error": str(value) or type(value).__name__}, None))
            elif kind == "error":
                results.put((row, None, value))

        with self._stats_lock:
            if self.stats.first_submit is None:
                self.stats.first_submit = time.perf_counter()
        try:
            self.engine.submit(prepared.sample, prepared.params, on_event)
        except RuntimeError as error:  # the engine is shutting down
            results.put((row, None, error))

    def _count(self, record: dict) -> None:
        with self._stats_lock:
            self.stats.rows += 1
            self.stats.errors += "error" in record
            self.stats.tokens += record.get("completion_tokens", 0)
            self.stats.last_result = time.perf_counter()

    def close(self) -> None:
        self.preparer.close()
        self.engine.close()
