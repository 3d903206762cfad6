"""Off CUDA the server schedules with the continuous-batching engine, which batches step by step: on the CPU with the
tiny fixture checkpoint, a short request (16 new tokens) sent 0.3 s after a long one (400 new
tokens) takes at most 3 times what it takes alone, and both get their own full answers; and a
request's submission does not hold up the event loop."""
import asyncio
import statistics
import threading
import time

import httpx
import torch

from deepseek_vl2.engine import ChatEngine, GenerationParams
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.serve.app import create_app
from deepseek_vl2.serve.scheduler import ContinuousScheduler, Job, create_scheduler, threads_beside_event_loop
from deepseek_vl2.serve.settings import ServerSettings
from goldens import CHECKPOINTS
from serve_helpers import ServerThread

LONG = GenerationParams(max_new_tokens=400, min_new_tokens=400, temperature=0)
SHORT = GenerationParams(max_new_tokens=16, min_new_tokens=16, temperature=0)


async def answer(scheduler, sample, params, delay: float = 0.0):
    """(seconds from submission to the result, the ChatResult, when it ended)."""
    await asyncio.sleep(delay)
    job = Job(sample, params, asyncio.get_running_loop())
    started = time.perf_counter()
    scheduler.submit(job)
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise value
        if kind == "done":
            ended = time.perf_counter()
            return ended - started, value, ended


def test_short_request_is_not_held_up_by_a_long_one():
    chat = ChatEngine.load(str(CHECKPOINTS["tiny_mha"]), device="cpu", dtype=torch.float32)
    scheduler = create_scheduler(chat, max_batch_size=4)  # on the CPU: the continuous engine
    assert isinstance(scheduler, ContinuousScheduler)
    threads = torch.get_num_threads()
    scheduler.start()
    assert torch.get_num_threads() == threads_beside_event_loop(threads)
    seen = []  # a thread started later (a request's preparation) takes the setting when it runs torch
    worker = threading.Thread(target=lambda: seen.append((torch.ones(4096).sum().item(), torch.get_num_threads())))
    worker.start()
    worker.join()
    assert seen == [(4096.0, threads_beside_event_loop(threads))]
    try:
        def conversation(text):
            return [{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]

        long_sample = chat.prepare_one(conversation("Write a very long story about the sea."), [])
        short_sample = chat.prepare_one(conversation("Say hi."), [])

        async def scenario():
            alone = [(await answer(scheduler, short_sample, SHORT))[0] for _ in range(3)]  # the first warms up
            (_, long_result, long_end), (short_s, short_result, short_end) = await asyncio.gather(
                answer(scheduler, long_sample, LONG), answer(scheduler, short_sample, SHORT, delay=0.3))
            return statistics.median(alone), long_result, long_end, short_s, short_result, short_end

        alone_s, long_result, long_end, short_s, short_result, short_end = asyncio.run(scenario())
    finally:
        scheduler.close()
    print(f"short alone {alone_s:.3f} s, next to a long one {short_s:.3f} s")
    assert len(long_result.token_ids) == 400 and len(short_result.token_ids) == 16
    assert short_end < long_end, "the long request ended first: nothing was measured"
    assert short_s <= 3 * alone_s, f"the short request took {short_s:.3f} s next to a long one, {alone_s:.3f} s alone"
    assert scheduler.engine.slots.free_count == 4
    assert torch.get_num_threads() == threads, "closing the scheduler gives torch its threads back"


def test_a_cpu_engine_leaves_the_event_loop_a_core(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads_beside_event_loop(4) == 3  # the process's 4 cores: one left to the event loop
    assert threads_beside_event_loop(8) == 3
    assert threads_beside_event_loop(2) == 2  # already fewer threads than cores: kept
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert threads_beside_event_loop(1) == 1  # one core: nothing to leave


class SlowInputsEngine(ContinuousEngine):
    """The continuous engine, its host tensors made slowly (as a 10-tile image's are: a batch, a cast
    and a pinned copy of ~9 MB take milliseconds)."""

    entered = threading.Event()

    def host_inputs(self, sample):
        self.entered.set()
        time.sleep(1.0)
        return super().host_inputs(sample)


def test_the_event_loop_is_free_while_a_request_is_submitted():
    """A request's submission (its host tensors) runs off the event loop: meanwhile the server
    answers others, and streamed tokens of the running rows would go out."""
    chat = ChatEngine.load(str(CHECKPOINTS["tiny_mha"]), device="cpu", dtype=torch.float32)
    engine = SlowInputsEngine(chat.model, chat.processor, max_num_seqs=2)
    with ServerThread(create_app(engine, ServerSettings(model_id="tiny", scheduler="continuous"))) as running:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        replies = []
        thread = threading.Thread(target=lambda: replies.append(
            httpx.post(running.base + "/v1/chat/completions", json=body, timeout=60)))
        thread.start()
        assert engine.entered.wait(30)
        started = time.perf_counter()
        assert httpx.get(running.base + "/health", timeout=5).status_code == 200
        waited = time.perf_counter() - started
        thread.join(60)
    assert waited < 0.5, f"/health waited {waited:.2f} s for a submission"
    assert replies[0].status_code == 200 and replies[0].json()["usage"]["completion_tokens"] == 3
