"""The continuous engine in a process of its own (`--engine-process`), the server's process keeping
HTTP, request preparation and streaming.

Why: in one interpreter the engine's thread (a decode step every millisecond or two for a small
model, much of it Python) shares the interpreter lock with the event loop (every streamed chunk)
and with the threads that decode, tile and tokenize new requests' images (tens of milliseconds of
CPU each). Each waits for the others' turns, and those waits show as gaps between streamed tokens.
In two processes the engine's interpreter runs only the engine.

    engine = EngineProcess(build, processor)   # spawns the process; returns once its engine is ready
    app = create_app(engine, settings)         # the app uses it as its scheduler

`build(processor)` runs in the new process and returns the ContinuousEngine (it must pickle: a
module-level function or a functools.partial of one; `checkpoint_engine` loads a checkpoint). The
processor is made here and sent there, so both sides tokenize alike.

Protocol over one pipe. Server -> engine: ("submit", key, inputs, prompt_tokens, params) with the
request's batch of one made here (its tensors cross through shared memory, and the engine process
copies them into pinned memory at once), ("cancel", key), ("close",). Engine -> server: ("ready",
info) or ("failed", reason) once; then ("events", [(key, kind, value), ...], stats): the
request events of the Job protocol (text, done, error) gathered while the last batch was being
sent, with a snapshot of the engine's counters when a request ended or STATS_EVERY_S passed. A
thread on each side reads the pipe. If the engine process ends, every request in flight fails,
`on_ended` is called (the app marks the server unhealthy, and the command line exits so that a
supervisor restarts it) and new requests get 503.
"""
import itertools
import logging
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.multiprocessing

from ..engine.continuous import ContinuousEngine, batch_inputs
from ..engine.prefill import PrefillSettings
from .errors import APIError
from .scheduler import Job, SchedulerStats, engine_stats

logger = logging.getLogger(__name__)

STATS_EVERY_S = 0.05  # the engine process's counters reach /health at least this often while it works
STARTUP_TIMEOUT_S = 1800.0  # loading, compiling and capturing a large model


@dataclass
class EngineInfo:
    """What the engine process reports once its engine is ready."""
    startup_summary: str
    max_num_seqs: int
    capacity: int  # tokens per KV slot: prompt and answer
    dtype: torch.dtype


class EngineProcess:
    """The server's side: the processor (preparation happens here), and the scheduler protocol
    (`start`, `submit`, `close`, `alive`, `waiting`, `stats`, `max_batch_size`) for the engine over there."""

    def __init__(self, build: Callable, processor, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.on_error: Optional[Callable[[BaseException], None]] = None  # each failed request's error (the app's)
        self.on_ended: Optional[Callable[[str], None]] = None  # the engine process ended unexpectedly (the app's)
        context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_engine_main, args=(build, processor, child_conn), name="engine",
                                       daemon=True)
        self.process.start()
        child_conn.close()
        if not self._conn.poll(startup_timeout_s):
            self.process.kill()
            raise RuntimeError(f"the engine process was not ready after {startup_timeout_s:.0f} s")
        try:
            kind, info = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process ended while starting (exit code {self.process.exitcode})") from None
        if kind == "failed":
            self.process.join(10)
            raise RuntimeError(f"the engine process could not build its engine: {info}")
        self.info: EngineInfo = info
        self.max_batch_size = info.max_num_seqs
        self.context_length = info.capacity
        self.startup_summary = info.startup_summary
        logger.info("engine process %d ready: %d KV slots of %d tokens; %s", self.process.pid, info.max_num_seqs,
                    info.capacity, info.startup_summary)
        self._jobs: Dict[int, Job] = {}
        self._keys = itertools.count()
        self._send_lock = threading.Lock()
        self._stats = SchedulerStats()
        self._waiting = 0
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)

    # ---- the caller's side -----------------------------------------------------------------------

    def prepare_one(self, conversation: list, images: list):
        from ..engine.chat_engine import prepare_sample

        return prepare_sample(self.processor, conversation, images, self.context_length)

    def start(self) -> None:
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and self._reader.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    def submit(self, job: Job) -> None:
        """Send the job's batch of one (made here, on the caller's thread) to the engine process."""
        if self._closing or not self.alive:
            raise APIError(503, "the engine process is not running; the server must be restarted",
                           code="server_unhealthy")
        key = next(self._keys)
        inputs = batch_inputs(self.processor, job.sample, self.info.dtype)
        prompt_tokens = len(job.sample)
        job.sample = None  # the engine process holds what it needs of it
        job.handle = _RemoteHandle(self, key)
        self._jobs[key] = job
        try:
            self._send(("submit", key, inputs, prompt_tokens, job.params))
        except BaseException:
            self._jobs.pop(key, None)
            raise
        if job.cancelled.is_set():
            job.handle.cancel()

    def cancel(self, key: int) -> None:
        try:
            self._send(("cancel", key))
        except (OSError, ValueError):  # the engine process has gone: nothing runs
            pass

    def close(self, timeout_s: float = 30.0) -> None:
        self._closing = True
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    # ---- the reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                kind, events, stats = self._conn.recv()
                if stats is not None:
                    self._stats, self._waiting = stats
                for key, event, value in events:
                    job = self._jobs.pop(key) if event in ("done", "error") else self._jobs.get(key)
                    if job is None:
                        continue
                    if event == "error" and self.on_error is not None:
                        self.on_error(value)
                    job.emit(event, value)
        except (EOFError, OSError):
            pass
        if not self._closing:
            self.process.join(5)
            reason = f"the engine process ended unexpectedly (exit code {self.process.exitcode})"
            logger.critical(reason)
            if self.on_ended is not None:
                self.on_ended(reason)
        self._fail_all(RuntimeError("the engine process has ended"))

    def _fail_all(self, error: Exception) -> None:
        while self._jobs:
            _, job = self._jobs.popitem()
            job.emit("error", error)


class _RemoteHandle:
    """Job.handle for a request in the engine process."""

    def __init__(self, engine: EngineProcess, key: int):
        self.engine, self.key = engine, key

    def cancel(self) -> None:
        self.engine.cancel(self.key)


# ---- the engine process -----------------------------------------------------------------------------

def checkpoint_engine(model_path: str, device: Optional[str], dtype: Optional[str], quantization: Optional[str],
                      max_num_seqs: int, prefill: PrefillSettings, processor) -> ContinuousEngine:
    """A `build` for EngineProcess (with functools.partial): the checkpoint's model, loaded in the
    engine process, and a ContinuousEngine with `max_num_seqs` KV slots and `prefill`."""
    from ..engine.loading import default_device, default_dtype
    from ..models import DeepseekVLV2ForCausalLM

    device = device or default_device()
    model = DeepseekVLV2ForCausalLM.from_pretrained(model_path, device_map=device, quantization=quantization,
                                                    dtype=getattr(torch, dtype) if dtype else default_dtype(device))
    return ContinuousEngine(model, processor, max_num_seqs=max_num_seqs, prefill=prefill)


def _engine_main(build: Callable, processor, conn) -> None:
    try:
        engine = build(processor)
    except BaseException as error:
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    outbox = _Outbox(conn, engine)
    conn.send(("ready", EngineInfo(engine.startup_summary, engine.slots.max_num_seqs, engine.slots.capacity,
                                   engine.dtype)))
    engine.start()
    handles = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server has gone
            break
        if message[0] == "close":
            break
        if message[0] == "cancel":
            handle = handles.get(message[1])
            if handle is not None:
                engine.cancel(handle)
            continue
        _, key, inputs, prompt_tokens, params = message
        try:
            handles[key] = engine.submit_inputs(engine.pinned(inputs), prompt_tokens, params,
                                                on_event=outbox.events_of(key, handles))
        except Exception as error:
            outbox.put(key, "error", error)
        del inputs, message  # the shared-memory copies go now
    engine.close()
    outbox.close()


class _Outbox:
    """The engine process's events, sent in batches by a thread of their own (the engine's thread
    only appends to a list)."""

    def __init__(self, conn, engine: ContinuousEngine):
        self.conn, self.engine = conn, engine
        self.events = []
        self.ended = False  # a request ended since the last batch: send the counters with it
        self.condition = threading.Condition()
        self.closing = False
        self.stats_sent = 0.0
        self.thread = threading.Thread(target=self._send, name="engine-outbox", daemon=True)
        self.thread.start()

    def events_of(self, key: int, handles: dict) -> Callable[[str, object], None]:
        def on_event(kind, value):
            if kind == "token":  # the server streams text; token ids come with the result
                return
            if kind in ("done", "error"):
                handles.pop(key, None)
            self.put(key, kind, value)
        return on_event

    def put(self, key: int, kind: str, value) -> None:
        if kind == "error":
            value = _picklable(value)
        with self.condition:
            self.events.append((key, kind, value))
            self.ended |= kind in ("done", "error")
            self.condition.notify()

    def _send(self) -> None:
        while True:
            with self.condition:
                while not self.events and not self.closing:
                    self.condition.wait(STATS_EVERY_S)
                    if time.monotonic() - self.stats_sent >= STATS_EVERY_S:
                        break
                if self.closing and not self.events:
                    return
                events, self.events = self.events, []
                ended, self.ended = self.ended, False
            stats = None
            if ended or time.monotonic() - self.stats_sent >= STATS_EVERY_S:
                stats, self.stats_sent = (engine_stats(self.engine), self.engine.waiting), time.monotonic()
            if not events and stats is None:
                continue
            try:
                self.conn.send(("events", events, stats))
            except (OSError, ValueError):  # the server has gone
                return

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify()
        self.thread.join(10)


def _picklable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError with its type and message when it does not pickle."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
