"""benchmarks/server_timeline.py's figures per thread: a thread that computes shows the CPU seconds it
used under its own name, one that sleeps none, and the span starts over at each summary; run delays
stay within the span; the watch thread names the thread that held the interpreter lock; an engine
process's pieces show when its thread sent them."""
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from server_timeline import ServerTimeline, thread_cpu_seconds, thread_run_delay_seconds  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc/self/task")


def test_each_thread_shows_the_cpu_seconds_it_used_in_the_span():
    stop = threading.Event()

    def compute():
        while not stop.is_set():
            sum(range(1000))

    timeline = ServerTimeline()
    busy = threading.Thread(target=compute, name="busy-thread")
    idle = threading.Thread(target=stop.wait, name="idle-thread")
    busy.start()
    idle.start()
    try:
        time.sleep(0.4)
        started = time.perf_counter()  # the second span at most (a summary's reads may wait for the busy thread)
        first = timeline.summary()["thread_cpu"]
        time.sleep(0.4)
        second = timeline.summary()["thread_cpu"]
        second_span = time.perf_counter() - started
        now = thread_cpu_seconds()
    finally:
        stop.set()
        busy.join()
        idle.join()
    # the computing thread holds the interpreter most of each span (the main thread only sleeps)
    assert first["busy-thread"] >= 0.1, first
    assert 0.1 <= second["busy-thread"] <= second_span + 0.05, (second, second_span)  # this span only, not the total
    assert "idle-thread" not in first and "idle-thread" not in second  # no CPU used: left out
    assert now["busy-thread"] >= first["busy-thread"] + second["busy-thread"] - 0.05
    assert list(first) == sorted(first, key=first.get, reverse=True)  # the busiest first


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="a kernel without schedstat")
def test_run_delay_is_reported_per_thread_and_never_exceeds_the_span():
    timeline = ServerTimeline()
    time.sleep(0.2)
    delays = timeline.summary()["thread_run_delay"]
    assert all(0 < seconds <= 0.3 for seconds in delays.values()), delays  # a thread waits at most the span
    assert "MainThread" in thread_run_delay_seconds()


def test_the_watch_thread_names_what_held_the_interpreter_lock():
    stop = threading.Event()

    def hold_the_lock():
        while not stop.is_set():
            sum(range(400_000))  # one C call: the lock stays with this thread for milliseconds
            time.sleep(0.004)

    timeline = ServerTimeline()
    holder = threading.Thread(target=hold_the_lock, name="lock-holder")
    holder.start()
    threading.Thread(target=timeline._watch_thread, name="timeline-watch", daemon=True).start()
    try:
        time.sleep(1.0)
        summary = timeline.summary()
    finally:
        stop.set()
        holder.join()
    assert summary["long_thread_lags"] >= 20, summary["thread_lag"]
    assert summary["thread_lag"]["max_ms"] >= 2.0
    holder_frames = sum(n for where, n in summary["frames_at_long_lags"].items()
                        if where.startswith("lock-holder: ") and "hold_the_lock" in where)
    assert holder_frames >= summary["long_thread_lags"] * 0.8, summary["frames_at_long_lags"]


def test_pieces_from_an_engine_process_show_when_its_thread_sent_them_and_how_late_they_arrived(monkeypatch):
    from types import SimpleNamespace

    from deepseek_vl2.serve import app as app_module, scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module.Job, "emit", lambda job, kind, value: None)  # install() wraps these two;
    monkeypatch.setattr(app_module, "next_event", app_module.next_event)  # monkeypatch puts them back after
    timeline = ServerTimeline()
    timeline.install()
    engine = SimpleNamespace(events_sent_at=None)  # an EngineProcess as the timeline reads it
    remote, local = scheduler_module.Job(None, None, None), scheduler_module.Job(None, None, None)
    remote.handle = SimpleNamespace(engine=engine)  # local: an engine in this process (no handle.engine)
    start = time.monotonic()
    for sent in (start - 0.010, start - 0.008, start - 0.004):  # sent 2 ms, then 4 ms apart, all before now
        engine.events_sent_at = sent
        scheduler_module.Job.emit(remote, "text", "x")
        scheduler_module.Job.emit(local, "text", "y")
    summary = timeline.summary()
    assert summary["engine_gaps"]["count"] == 2 and summary["engine_gaps"]["max_ms"] == pytest.approx(4.0)
    assert summary["pipe_delay"]["count"] == 3 and summary["pipe_delay"]["max_ms"] >= 10.0
    assert summary["emitted_gaps"]["count"] == 4  # both jobs' pieces, as taken here
    assert "engine_gaps" not in timeline.summary()  # the span starts over: nothing sent since
