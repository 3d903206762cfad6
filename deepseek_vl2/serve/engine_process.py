"""The continuous engine in a process of its own (`python -m deepseek_vl2.serve --engine-process`): the
server's process keeps HTTP, request preparation and streaming; the engine's process runs only the
engine.

Why: in one interpreter the engine's thread shares the interpreter lock with the event loop (every
streamed chunk) and with the threads that decode and tile new requests' images. Every torch call of
the engine's thread lets the lock go, and whoever takes it meanwhile keeps it until its own next
release, so a decode step waits out other threads' work; those waits show as gaps between streamed
tokens. In its own process the engine's interpreter runs only the engine.

    engine = EngineProcess(build, processor)   # spawns the process; returns once its engine is ready
    app = create_app(engine, settings)         # the app's scheduler: the same protocol as ContinuousScheduler

`build()` runs in the new process and returns the ContinuousEngine with its processor (it must
pickle: a module-level function or a functools.partial of one; `checkpoint_engine` loads a
checkpoint). `processor` prepares the requests here: the same processor as the engine's (both
tokenize alike).

Three pipes. Requests (server -> engine): (key, prompt_tokens, params, header), then the raw bytes of
each tensor of the request's batch of one (made here; the engine's process reads them straight into
pinned memory, the interpreter lock free while it does). Control (server -> engine): ("cancel", key),
("close",). Events (engine -> server): ("ready", EngineInfo) or ("failed", reason) once; then
("events", [(key, kind, value), ...], stats, sent_at): the Job protocol's events (text, done, error),
written by the engine's thread once per iteration (no other thread of that process sends them), with
the engine's counters when a request ended or STATS_EVERY_S passed, and the time it sent them
(time.monotonic(): on Linux one clock for both processes). The event loop reads them (`add_reader`: no
thread of the server waits on the pipe). If the engine's process ends, every request in flight fails,
/health says so and `on_ended` is called (the command line exits, so that a supervisor restarts it).
"""
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..engine.chat_engine import prepare_sample
from ..engine.continuous import ContinuousEngine, batch_of_one
from ..engine.prefill import PrefillSettings
from ..processing.batching import BatchCollateOutput
from ..utils.parent_watch import end_with_parent
from .errors import APIError
from .scheduler import Job, SchedulerStats, continuous_stats, threads_beside_event_loop

logger = logging.getLogger(__name__)

STATS_EVERY_S = 0.05  # while the engine works, its counters reach /health at least this often
STARTUP_TIMEOUT_S = 1800.0  # loading, compiling and capturing a large model
EVENTS_PIPE_BYTES = 1 << 20  # room for the events of a loop that stalls: the engine's thread blocks only past it


@dataclass
class EngineInfo:
    """What the engine's process reports once its engine is ready."""

    startup_summary: str
    max_num_seqs: int
    capacity: int  # tokens per KV slot: prompt and answer
    dtype: torch.dtype  # the images' dtype the engine takes


class EngineProcess:
    """The server's side: the processor (requests are prepared here) and the scheduler protocol
    (`start`, `submit`, `close`, `alive`, `waiting`, `stats`, `max_batch_size`, `on_error`) for the
    engine over there."""

    def __init__(self, build: Callable[[], ContinuousEngine], processor,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.on_error: Optional[Callable[[BaseException], None]] = None  # each failed request's error
        self.on_ended: Optional[Callable[[str], None]] = None  # the engine's process ended unexpectedly
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        requests_out, self._requests = context.Pipe(duplex=False)
        control_out, self._control = context.Pipe(duplex=False)
        self._events, events_in = context.Pipe(duplex=False)
        _widen(self._events.fileno(), EVENTS_PIPE_BYTES)
        self.process = context.Process(target=_engine_main, name="deepseek_vl2-engine",
                                       args=(build, requests_out, control_out, events_in))
        self.process.start()
        for end in (requests_out, control_out, events_in):
            end.close()
        try:
            self.info: EngineInfo = self._wait_until_ready(startup_timeout_s)
        except BaseException:  # Ctrl-C while the model loads, say: the engine's process goes too
            self.process.kill()
            self.process.join(10)
            raise
        self.max_batch_size = self.info.max_num_seqs
        self.context_length = self.info.capacity
        self.startup_summary = self.info.startup_summary
        logger.info("engine process %d ready: %d KV slots of %d tokens; %s", self.process.pid,
                    self.info.max_num_seqs, self.info.capacity, self.info.startup_summary)
        self._jobs: Dict[int, Job] = {}
        self._next_key = 0
        self._requests_lock, self._control_lock = threading.Lock(), threading.Lock()
        self._stats, self._waiting = SchedulerStats(), 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing = self._ended = False
        self.events_sent_at: Optional[float] = None  # when the events being handed out left the engine's thread

    def _wait_until_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while not self._events.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process ended while starting (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the engine process was not ready after {timeout_s:.0f} s")
        try:
            kind, info = self._events.recv()
        except EOFError:
            self.process.join(10)
            raise RuntimeError(f"the engine process ended while starting (exit code {self.process.exitcode})") from None
        if kind == "failed":
            self.process.join(10)
            raise RuntimeError(f"the engine process could not build its engine: {info}")
        return info

    # ---- the server's threads ---------------------------------------------------------------------

    def prepare_one(self, conversation: list, images: list):
        """One processed sample (PromptTooLongError when it does not fit a slot)."""
        return prepare_sample(self.processor, conversation, images, self.context_length)

    def start(self) -> None:
        """On the event loop (the app's start-up): its reader takes the engine's events from now on."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._events.fileno(), self._read_events)

    @property
    def alive(self) -> bool:
        return not self._ended and self.process.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    def submit(self, job: Job) -> None:
        """Send the job's batch of one (made here, on the caller's thread) to the engine's process."""
        if self._closing or not self.alive:
            raise APIError(503, "the engine process is not running; the server must be restarted",
                           code="server_unhealthy")
        header, payloads = wire_header(batch_of_one(self.processor, job.sample, self.info.dtype))
        with self._requests_lock:
            key, self._next_key = self._next_key, self._next_key + 1
            self._jobs[key] = job
            job.handle = _RemoteHandle(self, key)
            prompt_tokens, job.sample = len(job.sample), None  # a queued job keeps no pixels here
            try:
                self._requests.send((key, prompt_tokens, job.params, header))
                for payload in payloads:
                    write_payload(self._requests.fileno(), payload)
            except OSError as error:
                self._jobs.pop(key, None)
                raise APIError(503, "the engine process is not running; the server must be restarted",
                               code="server_unhealthy") from error
        if job.cancelled.is_set():
            job.handle.cancel()

    def cancel(self, key: int) -> None:
        if key in self._jobs:  # a request that has ended has nothing to cancel over there
            self._send_control(("cancel", key))

    def close(self, timeout_s: float = 30.0) -> None:
        self._closing = True
        self._send_control(("close",))
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._stop_reading()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _send_control(self, message) -> None:
        try:
            with self._control_lock:
                self._control.send(message)
        except (OSError, ValueError):  # the engine's process has gone: nothing runs there
            pass

    # ---- the event loop ---------------------------------------------------------------------------

    def _read_events(self) -> None:
        try:
            while self._events.poll():
                _, events, stats, self.events_sent_at = self._events.recv()
                if stats is not None:
                    self._stats, self._waiting = stats
                for key, kind, value in events:
                    job = self._jobs.pop(key, None) if kind in ("done", "error") else self._jobs.get(key)
                    if job is None:
                        continue
                    if kind == "error" and self.on_error is not None:
                        self.on_error(value)
                    job.emit(kind, value)
        except (EOFError, OSError):
            self._process_ended()

    @property
    def ended_reason(self) -> str:
        """Why the engine is not alive (/health may see the process gone before the loop reads its pipe's end)."""
        if self._closing:
            return "the engine process has been closed"
        return f"the engine process ended unexpectedly (exit code {self.process.exitcode})"

    def _process_ended(self) -> None:
        self._stop_reading()
        self._ended = True
        if not self._closing:
            self.process.join(5)
            reason = self.ended_reason
            logger.critical(reason)
            if self.on_ended is not None:
                self.on_ended(reason)
        self._fail_all(RuntimeError("the engine process has ended"))

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._events.fileno())
            except (OSError, ValueError):  # the pipe is closed already
                pass
        self._loop = None

    def _fail_all(self, error: Exception) -> None:
        while self._jobs:
            _, job = self._jobs.popitem()
            job.emit("error", error)


class _RemoteHandle:
    """Job.handle of a request in the engine's process."""

    def __init__(self, engine: EngineProcess, key: int):
        self.engine, self.key = engine, key

    def cancel(self) -> None:
        self.engine.cancel(self.key)


# ---- a batch on the wire ----------------------------------------------------------------------------

def wire_header(batch: BatchCollateOutput):
    """(header, payloads): each field's dtype, shape and byte count (tensors) or value (the rest), and
    the tensors' bytes in field order (flat uint8 views, no copy of a contiguous tensor)."""
    header, payloads = {}, []
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            flat = value.contiguous().reshape(-1).view(torch.uint8)
            header[name] = ("tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape), flat.numel())
            payloads.append(flat)
        else:
            header[name] = ("value", value)
    return header, payloads


def read_batch(connection, header: dict, pin: bool) -> BatchCollateOutput:
    """The batch `header` describes, its tensors read from `connection` into (pinned, with `pin`) memory."""
    fields = {}
    for name, spec in header.items():
        if spec[0] == "value":
            fields[name] = spec[1]
            continue
        _, dtype, shape, size = spec
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        _read_into(connection.fileno(), buffer)
        fields[name] = buffer.view(getattr(torch, dtype)).reshape(shape)
    return BatchCollateOutput(**fields)


def _widen(fd: int, size: int) -> None:
    """Give the pipe `size` bytes of room where Linux allows it (else its default stays)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass


def write_payload(fd: int, payload: torch.Tensor) -> None:
    view = memoryview(payload.numpy()).cast("B")
    sent = 0
    while sent < len(view):
        sent += os.write(fd, view[sent:])


def _read_into(fd: int, buffer: torch.Tensor) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the server closed the pipe in the middle of a request")
        got += n


# ---- the engine's process -----------------------------------------------------------------------------

def checkpoint_engine(model_path: str, device: Optional[str], dtype: Optional[str], quantization: Optional[str],
                      max_num_seqs: int, prefill: PrefillSettings) -> ContinuousEngine:
    """A `build` for EngineProcess (with functools.partial): the checkpoint's processor and model, loaded
    in the engine's process, and a ContinuousEngine with `max_num_seqs` KV slots and `prefill`."""
    from ..engine.loading import load_model_and_processor

    processor, model = load_model_and_processor(model_path, device=device, dtype=getattr(torch, dtype) if dtype
                                                else None, quantization=quantization)
    return ContinuousEngine(model, processor, max_num_seqs=max_num_seqs, prefill=prefill)


def _engine_main(build: Callable[[], ContinuousEngine], requests, control, events) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes this process
    end_with_parent()  # a server killed while this process loads the model leaves no orphan on the GPU
    try:
        engine = build()
    except BaseException as error:
        events.send(("failed", f"{type(error).__name__}: {error}"))
        return
    if engine.device.type == "cpu":  # a core stays with the server's event loop, as in one process
        torch.set_num_threads(threads_beside_event_loop(torch.get_num_threads()))
    outbox = _Outbox(events, engine)
    engine.after_step = outbox.flush
    events.send(("ready", EngineInfo(engine.startup_summary, engine.slots.max_num_seqs, engine.slots.capacity,
                                     engine.dtype)))
    engine.start()
    try:
        _serve(engine, requests, control, outbox)
    finally:
        engine.close()
        outbox.flush()  # the errors that closing gave the requests left


def _serve(engine: ContinuousEngine, requests, control, outbox: "_Outbox") -> None:
    """Take requests and cancellations until the server closes the engine or goes away."""
    pin = engine.device.type == "cuda"
    # a cancel may overtake its request (another pipe); one for a key below `next_key` not in `handles` came
    # after its request ended
    handles, cancelled_early, next_key = {}, set(), 0
    while True:
        for connection in multiprocessing.connection.wait([requests, control]):
            try:
                message = connection.recv()
                if connection is requests:
                    key, prompt_tokens, params, header = message
                    inputs = read_batch(requests, header, pin)
            except (EOFError, OSError):  # the server has gone
                return
            if connection is control:
                if message[0] == "close":
                    return
                handle = handles.get(message[1])
                if handle is not None:
                    engine.cancel(handle)
                elif message[1] >= next_key:
                    cancelled_early.add(message[1])
                continue
            next_key = key + 1
            try:
                handles[key] = engine.submit_inputs(inputs, prompt_tokens, params,
                                                    on_event=outbox.events_of(key, handles))
            except Exception as error:
                outbox.put(key, "error", error)
                outbox.flush()
                continue
            if key in cancelled_early:
                cancelled_early.discard(key)
                engine.cancel(handles[key])
            del inputs, message  # the engine holds the tensors now


class _Outbox:
    """The engine's events, sent by the engine's own thread once per iteration (`flush`)."""

    def __init__(self, connection, engine: ContinuousEngine):
        self.connection, self.engine = connection, engine
        self.lock = threading.Lock()  # put and flush also run on the process's main thread
        self.events = []
        self.ended = False  # a request ended since the last flush: send the counters with it
        self.stats_sent = 0.0

    def events_of(self, key: int, handles: dict) -> Callable[[str, object], None]:
        def on_event(kind, value):
            if kind == "token":  # the server streams text; the token ids come with the result
                return
            if kind in ("done", "error"):
                handles.pop(key, None)
            self.put(key, kind, value)
        return on_event

    def put(self, key: int, kind: str, value) -> None:
        if kind == "error":
            value = _picklable(value)
        with self.lock:
            self.events.append((key, kind, value))
            self.ended |= kind in ("done", "error")

    def flush(self) -> None:
        with self.lock:
            now = time.monotonic()
            stats = None
            if self.ended or now - self.stats_sent >= STATS_EVERY_S:
                stats, self.stats_sent = (continuous_stats(self.engine), self.engine.waiting), now
            events, self.events, self.ended = self.events, [], False
            if not events and stats is None:
                return
            try:
                self.connection.send(("events", events, stats, now))
            except (OSError, ValueError):  # the server has gone; the main thread ends at its pipe's end
                pass


def _picklable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError with its type and message when it does not pickle."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
