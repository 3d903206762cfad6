"""Where a streamed token's time goes inside the server (serve_bench.py `--timeline`).

Installed in the server process before the app is built, it records for every job:
  emitted    when the engine's thread hands a text piece to the job (Job.emit, engine side)
  delivered  when the event loop takes that piece off the job's queue to send it (app.next_event)
and, from a task on the event loop, how late a 1 ms sleep wakes up (the loop's lag: a loop busy
with other work, or waiting for the GIL, sends no chunk meanwhile).

`GET /bench/timeline` returns the summary since the previous call and starts over: the gaps between a
job's consecutive pieces on each side (p50 / p99 / max ms), emitted -> delivered (the delivery delay)
and the loop's lag. A client's inter-token gaps are the delivered gaps plus the socket's own jitter.
"""
import asyncio
import itertools
import threading
import time


def _pct(values, q):
    values = sorted(values)
    return 1e3 * values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def _stats(values) -> dict:
    return dict(count=len(values), p50_ms=_pct(values, 50), p99_ms=_pct(values, 99), max_ms=_pct(values, 100))


class ServerTimeline:
    def __init__(self):
        self.lock = threading.Lock()
        self.emitted, self.delivered, self.lags = {}, {}, []
        self.monitor = None
        self.keys = itertools.count()

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
        gaps = lambda times: [b - a for a, b in zip(times, times[1:])]  # noqa: E731
        delays = [d - e for job, times in delivered.items() for e, d in zip(emitted.get(job, []), times)]
        return dict(emitted_gaps=_stats([g for times in emitted.values() for g in gaps(times)]),
                    delivered_gaps=_stats([g for times in delivered.values() for g in gaps(times)]),
                    delivery_delay=_stats(delays), loop_lag=_stats(lags))
