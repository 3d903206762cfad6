"""Where a streamed token's time goes inside the server (serve_bench.py `--timeline`).

Installed in the server process before the app is built, it records for every job:
  emitted    when the engine's thread hands a text piece to the job (Job.emit, engine side)
  delivered  when the event loop takes that piece off the job's queue to send it (app.next_event)
and, from a task on the event loop, how late a 1 ms sleep wakes up (the loop's lag: a loop busy
with other work, or waiting for the GIL, sends no chunk meanwhile).

`GET /bench/timeline` returns the summary since the previous call and starts over: the gaps between a
job's consecutive pieces on each side (p50 / p99 / max ms), emitted -> delivered (the delivery delay)
and the loop's lag. A client's inter-token gaps are the delivered gaps plus the socket's own jitter.
It also gives the CPU seconds each thread of the server process used meanwhile (`thread_cpu`, Linux):
the threads beside the engine's that compete with it for the interpreter lock, and how much.
"""
import asyncio
import itertools
import os
import threading
import time


def _pct(values, q):
    values = sorted(values)
    return 1e3 * values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def _stats(values) -> dict:
    return dict(count=len(values), p50_ms=_pct(values, 50), p99_ms=_pct(values, 99), max_ms=_pct(values, 100))


def thread_cpu_seconds(task_dir: str = "/proc/self/task") -> dict:
    """CPU seconds (user + system) that each thread of this process has used so far, by name, threads
    of one name summed: a Python thread by its name (threading), another (torch's pools, the CUDA
    driver's) by its kernel name; {} where the kernel does not list threads so (not Linux). Threads that
    have ended are no longer listed (the server's are long-lived: engine, prefill, loop, workers)."""
    try:
        native_ids = os.listdir(task_dir)
    except OSError:
        return {}
    python_names = {str(thread.native_id): thread.name for thread in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for native_id in native_ids:
        try:
            with open(os.path.join(task_dir, native_id, "stat")) as stat:
                kernel_name, fields = stat.read().rsplit(")", 1)
        except OSError:  # the thread ended meanwhile
            continue
        fields = fields.split()  # from the state on: user and system time are the 12th and 13th
        name = python_names.get(native_id) or "native: " + kernel_name.split("(", 1)[1]
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


class ServerTimeline:
    def __init__(self):
        self.lock = threading.Lock()
        self.emitted, self.delivered, self.lags = {}, {}, []
        self.monitor = None
        self.keys = itertools.count()
        self.cpu = thread_cpu_seconds()  # at the start of the current span

    def key(self, job) -> int:
        """A key of the job's own (an id() may be reused once a job is gone)."""
        return job.__dict__.setdefault("_timeline_key", next(self.keys))

    def install(self) -> None:
        """Wrap Job.emit and app.next_event (module globals, looked up at each call)."""
        from deepseek_vl2.serve import app as app_module, scheduler as scheduler_module

        emit, next_event, timeline = scheduler_module.Job.emit, app_module.next_event, self

        def timed_emit(job, kind, value):
            if kind == "text":
                with timeline.lock:
                    timeline.emitted.setdefault(timeline.key(job), []).append(time.perf_counter())
            emit(job, kind, value)

        async def timed_next_event(job, *args, **kwargs):
            event = await next_event(job, *args, **kwargs)
            if event is not None and event[0] == "text":
                timeline.delivered.setdefault(timeline.key(job), []).append(time.perf_counter())
            return event

        scheduler_module.Job.emit = timed_emit
        app_module.next_event = timed_next_event

    def add_route(self, app) -> None:
        @app.get("/bench/timeline")
        async def timeline():
            if self.monitor is None:
                self.monitor = asyncio.get_running_loop().create_task(self._watch_loop())
            return self.summary()

    async def _watch_loop(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - started - 0.001)

    def summary(self) -> dict:
        with self.lock:
            emitted, self.emitted = self.emitted, {}
        delivered, self.delivered = self.delivered, {}
        lags, self.lags = self.lags, []
        cpu, before = thread_cpu_seconds(), self.cpu
        self.cpu = cpu
        used = {name: round(seconds - before.get(name, 0.0), 2) for name, seconds in cpu.items()}
        gaps = lambda times: [b - a for a, b in zip(times, times[1:])]  # noqa: E731
        delays = [d - e for job, times in delivered.items() for e, d in zip(emitted.get(job, []), times)]
        return dict(emitted_gaps=_stats([g for times in emitted.values() for g in gaps(times)]),
                    delivered_gaps=_stats([g for times in delivered.values() for g in gaps(times)]),
                    delivery_delay=_stats(delays), loop_lag=_stats(lags),
                    thread_cpu=dict(sorted(((k, v) for k, v in used.items() if v > 0), key=lambda kv: -kv[1])))
