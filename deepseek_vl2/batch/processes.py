"""Several engines of one machine, each in its own process (one per GPU; or several CPU engines),
over one input: the parent hands each row to the first engine process with room for it (each has a
small queue of its own; no static split: an engine that runs ahead takes more, and none sits idle at
the end while rows wait), and writes every record into the one output file. The queues are not
shared: a process killed while it waits on its queue holds that queue's lock, which would stop
every process reading a shared one.

Processes are started with `spawn` (CUDA cannot be used in a forked child), each GPU worker seeing
its GPU alone (CUDA_VISIBLE_DEVICES, so that every thread of it, the engine's included, has that GPU
as its current device: "cuda:1" of this process is "cuda:0" there). A worker whose engine
cannot be built reports why and exits; the others go on. A worker that dies mid-run loses only its
rows in flight: they are not in the output, and a rerun answers them.
"""
import multiprocessing
import os
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

from ..engine import GenerationParams
from ..utils.parent_watch import end_with_parent
from .driver import EngineFailed
from .engine_spec import EngineSpec
from .rows import Row

POLL_S = 1.0  # how often the parent checks that its workers are alive while waiting for records
ROWS_AHEAD = 2  # rows waiting in each worker's queue (it holds the ones it is answering besides)
HAND_OUT_WAIT_S = 0.01  # how long the parent waits before trying the workers' full queues again


class WorkersFailed(EngineFailed):
    """No engine process is left to answer the remaining rows."""


@dataclass
class WorkerReport:
    index: int
    device: str
    startup: str = ""  # the engine's startup summary (graphs captured, ...)
    rows: int = 0
    tokens: int = 0
    busy_s: float = 0.0  # first row submitted to last answer
    decode_steps: int = 0
    max_running: int = 0
    error: Optional[str] = None  # why the worker ended without finishing

    def line(self) -> str:
        name = f"engine {self.index} ({self.device})"
        if self.error:
            return f"{name}: {self.error}"
        return (f"{name}: {self.rows} rows, {self.tokens} tokens, busy {self.busy_s:.1f} s, "
                f"{self.decode_steps} decode steps, up to {self.max_running} rows at once")


@dataclass
class ProcessSettings:
    """What each worker needs besides its device (plain data: it is pickled to every worker)."""

    spec: EngineSpec
    defaults: GenerationParams
    in_flight: Optional[int] = None
    image_workers: Optional[int] = None
    torch_threads: Optional[int] = None  # CPU engines: intra-op threads per process


def worker_main(index: int, device: str, settings: ProcessSettings, work, results) -> None:
    """A worker process: build the engine on `device`, answer rows from `work` until its end marker."""
    report = WorkerReport(index, device)
    end_with_parent()
    try:
        import torch

        from .runner import EngineRunner

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        engine = settings.spec.build("cuda:0" if device.startswith("cuda") else device)
        report.startup = engine.startup_summary
        results.put(("ready", index, report))
        runner = EngineRunner(engine, settings.defaults, settings.in_flight, settings.image_workers)

        def rows():
            while True:
                row = work.get()
                if row is None:
                    return
                yield row

        runner.run(rows(), lambda row, record: results.put(("record", index, (row, record))))
        stats = runner.stats
        report.rows, report.tokens, report.busy_s = stats.rows, stats.tokens, stats.busy_s
        report.decode_steps, report.max_running = engine.stats.decode_steps, engine.stats.max_running
        runner.close()
    except (ValueError, OSError, EngineFailed) as error:  # an unusable checkpoint (a ValueError), failed rows
        report.error = f"{type(error).__name__}: {error}"
        results.put(("failed", index, report))
        return
    except BaseException:  # noqa: B036  (reported to the parent: the worker's end)
        report.error = traceback.format_exc(limit=8).strip()
        results.put(("failed", index, report))
        return
    results.put(("done", index, report))


def run_processes(devices: List[str], settings: ProcessSettings, rows: Iterable[Row],
                  emit: Callable[[Row, dict], None], on_ready: Optional[Callable[[WorkerReport], None]] = None
                  ) -> List[WorkerReport]:
    """Answer `rows` with one engine process per entry of `devices` ("cuda:0", "cpu", ...); `emit` is
    called on this thread. Returns each worker's report; WorkersFailed when every worker ended
    before the rows did."""
    context = multiprocessing.get_context("spawn")
    inboxes = [context.Queue(maxsize=ROWS_AHEAD) for _ in devices]
    results = context.Queue()
    workers = [context.Process(target=worker_main, args=(i, device, settings, inboxes[i], results), daemon=True,
                               name=f"batch-engine-{device}") for i, device in enumerate(devices)]
    for worker, device in zip(workers, devices):
        start_seeing(worker, device)
    reports = [WorkerReport(i, device) for i, device in enumerate(devices)]
    ended = [False] * len(devices)
    stop, all_fed = threading.Event(), threading.Event()
    feeder_error = []

    def live():
        return [inbox for inbox, worker, gone in zip(inboxes, workers, ended) if not gone and worker.is_alive()]

    def feed():
        try:
            for row in rows:
                if not _hand_out(live, row, stop):
                    return
            all_fed.set()
        except BaseException as error:  # noqa: B036  (re-raised below)
            feeder_error.append(error)
        for inbox in live():  # end markers, one per worker
            _put(inbox, None, stop)

    threading.Thread(target=feed, name="batch-rows", daemon=True).start()
    try:
        while not all(ended):
            try:
                kind, index, value = results.get(timeout=POLL_S)
            except queue.Empty:
                for index, worker in enumerate(workers):
                    if not ended[index] and not worker.is_alive() and results.empty():
                        ended[index] = True
                        reports[index].error = (f"the engine process exited with code {worker.exitcode}; its rows "
                                                "in flight are not in the output (a rerun answers them)")
                continue
            if kind == "record":
                emit(*value)
            elif kind == "ready":
                reports[index] = value
                if on_ready is not None:
                    on_ready(value)
            else:  # "done" or "failed"
                reports[index], ended[index] = value, True
    except BaseException:  # the output failed, or Ctrl-C: no worker's answer can be written any more
        stop.set()
        for worker in workers:
            worker.kill()
        raise
    finally:
        stop.set()  # a feeder still waiting for room gives up
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    if feeder_error:
        raise feeder_error[0]
    if not all_fed.is_set() or all(report.error for report in reports):
        raise WorkersFailed("the engine processes ended before the rows did:\n" +
                            "\n".join(report.line() for report in reports if report.error))
    return reports


def start_seeing(worker, device: str) -> None:
    """Start `worker` with only the GPU of `device` ("cuda:N": the N-th GPU this process sees) visible."""
    if not device.startswith("cuda"):
        worker.start()
        return
    index = int(device.partition(":")[2] or 0)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in saved.split(",")] if saved is not None else [str(i) for i in range(index + 1)]
    if index >= len(visible):
        raise ValueError(f"{device}: CUDA_VISIBLE_DEVICES={saved!r} shows {len(visible)} GPU(s)")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]  # a spawned child takes this environment
    try:
        worker.start()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _hand_out(live: Callable[[], list], row, stop: threading.Event) -> bool:
    """Put `row` in the queue of the first live worker with room, waiting while every queue is full;
    False when `stop` comes first or no worker is left."""
    while not stop.is_set():
        inboxes = live()
        if not inboxes:
            return False
        for inbox in inboxes:
            try:
                inbox.put_nowait(row)
                return True
            except queue.Full:
                continue
        stop.wait(HAND_OUT_WAIT_S)
    return False


def _put(work, item, stop: threading.Event) -> bool:
    """Put `item`, waiting while the queue is full; False when `stop` comes first."""
    while not stop.is_set():
        try:
            work.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def default_torch_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)
