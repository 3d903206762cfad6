"""benchmarks/server_timeline.py's CPU time per thread: a thread that computes shows the seconds it
used under its own name, one that sleeps none, and the span starts over at each summary."""
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from server_timeline import ServerTimeline, thread_cpu_seconds  # noqa: E402

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
        first = timeline.summary()["thread_cpu"]
        time.sleep(0.4)
        second = timeline.summary()["thread_cpu"]
        now = thread_cpu_seconds()
    finally:
        stop.set()
        busy.join()
        idle.join()
    # the computing thread holds the interpreter most of each span (the main thread only sleeps)
    assert 0.1 <= first["busy-thread"] <= 0.6, first
    assert 0.1 <= second["busy-thread"] <= 0.6, second  # this span only, not the total
    assert "idle-thread" not in first and "idle-thread" not in second  # no CPU used: left out
    assert now["busy-thread"] >= first["busy-thread"] + second["busy-thread"] - 0.05
    assert list(first) == sorted(first, key=first.get, reverse=True)  # the busiest first
