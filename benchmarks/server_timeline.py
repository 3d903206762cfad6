"""Where a streamed token's time goes inside the server (serve_bench.py `--timeline`).

Installed in the server process before the app is built, it records for every job:
  emitted    when the engine's thread hands a text piece to the job (Job.emit, engine side)
  delivered  when the event loop takes that piece off the job's queue to send it (app.next_event)
and, from a task on the event loop, how late a 1 ms sleep wakes up (the loop's lag: a loop busy
with other work, or waiting for the GIL, sends no chunk meanwhile). With the engine in a process of
its own, "emitted" is when the event loop takes the piece from the engine's pipe, and each piece
also has the time the engine's thread sent it (EngineProcess.events_sent_at):
  engine gaps  between a job's consecutive pieces as the engine's thread sent them
  pipe delay   sent -> emitted: the pipe and the loop's wait to read it

`GET /bench/timeline` returns the summary since the previous call and starts over: the gaps between a
job's consecutive pieces on each side (p50 / p99 / max ms), emitted -> delivered (the delivery delay)
and the loop's lag. A client's inter-token gaps are the delivered gaps plus the socket's own jitter.
It also gives the CPU seconds each thread of the server process used meanwhile (`thread_cpu`, Linux):
the threads beside the engine's that compete with it for the interpreter lock, and how much; and the
seconds each waited for a core while it could run (`thread_run_delay`): whether the engine's thread
lacked a CPU, not the lock.
"""
import asyncio
import collections
import itertools
import os
import sys
import threading
import time

LONG_LAG_S = 0.002  # a plain thread's 1 ms sleep this late: note what the other threads were running


def _pct(values, q):
    values = sorted(values)
    return 1e3 * values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def _stats(values) -> dict:
    return dict(count=len(values), p50_ms=_pct(values, 50), p99_ms=_pct(values, 99), max_ms=_pct(values, 100))


def _per_thread(read, task_dir: str) -> dict:
    """`read(task_path)` for each thread of this process, by name, threads of one name summed: a Python
    thread by its name (threading), another (torch's pools, the CUDA driver's) by its kernel name; {}
    where the kernel does not list threads so (not Linux). Threads that have ended are no longer listed
    (the server's are long-lived: engine, prefill, loop, workers)."""
    try:
        native_ids = os.listdir(task_dir)
    except OSError:
        return {}
    python_names = {str(thread.native_id): thread.name for thread in threading.enumerate()}
    values = {}
    for native_id in native_ids:
        path = os.path.join(task_dir, native_id)
        try:
            with open(os.path.join(path, "comm")) as comm:
                kernel_name = comm.read().strip()
            value = read(path)
        except OSError:  # the thread ended meanwhile
            continue
        name = python_names.get(native_id) or "native: " + kernel_name
        values[name] = values.get(name, 0.0) + value
    return values


def _cpu_seconds(path: str) -> float:
    with open(os.path.join(path, "stat")) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # from the state on: user and system time are 12th and 13th
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_delay_seconds(path: str) -> float:
    with open(os.path.join(path, "schedstat")) as schedstat:  # time on a CPU, time runnable but waiting, slices (ns)
        return int(schedstat.read().split()[1]) / 1e9


def thread_cpu_seconds(task_dir: str = "/proc/self/task") -> dict:
    """CPU seconds (user + system) that each thread of this process has used so far, by name."""
    return _per_thread(_cpu_seconds, task_dir)


def thread_run_delay_seconds(task_dir: str = "/proc/self/task") -> dict:
    """Seconds each thread of this process has waited for a CPU so far while it could run (the
    scheduler's run delay, /proc/<tid>/schedstat), by name: a thread that had work but no core to do
    it on, as when more threads spin than there are cores. Not the waits for the interpreter lock (a
    thread waiting for it sleeps). {} without schedstat (a kernel built without it)."""
    return _per_thread(_run_delay_seconds, task_dir)


def _span(now: dict, before: dict, digits: int = 2) -> dict:
    """Each name's increase since `before`, rounded, the largest first; names that did not grow left out."""
    grown = {name: round(value - before.get(name, 0.0), digits) for name, value in now.items()}
    return dict(sorted(((k, v) for k, v in grown.items() if v > 0), key=lambda kv: -kv[1]))


def _innermost(frame, depth: int = 3) -> str:
    """`file:line function < caller < ...`, the innermost `depth` frames."""
    parts = []
    while frame is not None and len(parts) < depth:
        parts.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


class ServerTimeline:
    def __init__(self):
        self.lock = threading.Lock()
        self.emitted, self.delivered, self.lags, self.thread_lags = {}, {}, [], []
        self.sent = {}  # job -> [(sent by the engine's process, taken here)], time.monotonic()
        self.frames_at_long_lags, self.frames_at_random = collections.Counter(), collections.Counter()
        self.monitor = None
        self.keys = itertools.count()
        self.cpu, self.delay = thread_cpu_seconds(), thread_run_delay_seconds()  # at the start of the span

    def key(self, job) -> int:
        """A key of the job's own (an id() may be reused once a job is gone)."""
        return job.__dict__.setdefault("_timeline_key", next(self.keys))

    def install(self) -> None:
        """Wrap Job.emit and app.next_event (module globals, looked up at each call)."""
        from deepseek_vl2.serve import app as app_module, scheduler as scheduler_module

        emit, next_event, timeline = scheduler_module.Job.emit, app_module.next_event, self

        def timed_emit(job, kind, value):
            if kind == "text":
                sent = getattr(getattr(job.handle, "engine", None), "events_sent_at", None)  # an engine process's
                with timeline.lock:
                    timeline.emitted.setdefault(timeline.key(job), []).append(time.perf_counter())
                    if sent is not None:
                        timeline.sent.setdefault(timeline.key(job), []).append((sent, time.monotonic()))
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
                threading.Thread(target=self._watch_thread, name="timeline-watch", daemon=True).start()
            return self.summary()

    async def _watch_loop(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - started - 0.001)

    def _watch_thread(self) -> None:
        """How late a plain thread's 1 ms sleep wakes (the interpreter lock held elsewhere, or no core):
        at each wake later than LONG_LAG_S, and at every 50th wake for comparison, the innermost
        frames of each other Python thread, where each stood when it let the lock go (frames much more
        common at long lags than at random ones are what kept the lock, just before that point)."""
        names = {}
        for count in itertools.count():
            started = time.perf_counter()
            time.sleep(0.001)
            lag = time.perf_counter() - started - 0.001
            self.thread_lags.append(lag)
            if lag > LONG_LAG_S or count % 50 == 0:
                counter = self.frames_at_long_lags if lag > LONG_LAG_S else self.frames_at_random
                me = threading.get_ident()
                for ident, frame in sys._current_frames().items():
                    if ident == me:
                        continue
                    if ident not in names:
                        names = {t.ident: t.name for t in threading.enumerate()}
                    counter[f"{names.get(ident, '?')}: {_innermost(frame)}"] += 1

    def summary(self) -> dict:
        with self.lock:
            emitted, self.emitted = self.emitted, {}
            sent, self.sent = self.sent, {}
        delivered, self.delivered = self.delivered, {}
        lags, self.lags = self.lags, []
        thread_lags, self.thread_lags = self.thread_lags, []
        at_long, self.frames_at_long_lags = self.frames_at_long_lags, collections.Counter()
        at_random, self.frames_at_random = self.frames_at_random, collections.Counter()
        cpu, cpu_before = thread_cpu_seconds(), self.cpu
        delay, delay_before = thread_run_delay_seconds(), self.delay
        self.cpu, self.delay = cpu, delay
        gaps = lambda times: [b - a for a, b in zip(times, times[1:])]  # noqa: E731
        delays = [d - e for job, times in delivered.items() for e, d in zip(emitted.get(job, []), times)]
        engine_process = {}
        if sent:
            engine_process = dict(
                engine_gaps=_stats([g for pairs in sent.values() for g in gaps([at for at, _ in pairs])]),
                pipe_delay=_stats([taken - at for pairs in sent.values() for at, taken in pairs]))
        return dict(**engine_process, emitted_gaps=_stats([g for times in emitted.values() for g in gaps(times)]),
                    delivered_gaps=_stats([g for times in delivered.values() for g in gaps(times)]),
                    delivery_delay=_stats(delays), loop_lag=_stats(lags), thread_lag=_stats(thread_lags),
                    long_thread_lags=sum(lag > LONG_LAG_S for lag in thread_lags),
                    frames_at_long_lags=dict(at_long.most_common(15)), frames_at_random=dict(at_random.most_common(15)),
                    thread_cpu=_span(cpu, cpu_before), thread_run_delay=_span(delay, delay_before, 3))
