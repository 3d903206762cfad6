"""`python -m deepseek_vl2.serve --engine-process`: the continuous engine in a process of its own.
Answers (greedy and seeded, streamed and whole, alone and concurrent) equal a direct ChatEngine call;
a client that leaves frees its row; a request's batch crosses the pipe unchanged; and when the
engine's process dies, /health says so and the server exits with the fatal exit code."""
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from deepseek_vl2.engine import ChatEngine, GenerationParams
from deepseek_vl2.processing.batching import BatchCollateOutput
from deepseek_vl2.serve.__main__ import FATAL_EXIT_CODE
from deepseek_vl2.serve.app import stopped_reason
from deepseek_vl2.serve.engine_process import read_batch, wire_header, write_payload
from serve_helpers import data_url, png_bytes, start_process, stop_process, tiny_checkpoint

RED, BLUE = (200, 30, 30), (30, 60, 220)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)


def start(tmp_path_factory, name: str):
    args = ["-m", "deepseek_vl2.serve", "--model_path", str(tiny_checkpoint(tmp_path_factory)), "--device", "cpu",
            "--dtype", "float32", "--max-num-seqs", "4", "--engine-process"]
    return start_process(args, "/health", tmp_path_factory.mktemp("logs") / f"{name}.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, base = start(tmp_path_factory, "engine_process")
    yield base
    stop_process(process)


def messages(text: str, color) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(color=color))}},
                                         {"type": "text", "text": text}]}]


def direct(engine, text, color, **settings):
    conversation = [{"role": "<|User|>", "content": "<image>\n" + text}, {"role": "<|Assistant|>", "content": ""}]
    return engine.chat(conversation, [Image.new("RGB", (64, 48), color)], GenerationParams(**settings))


REQUESTS = [("Describe the image.", RED, dict(temperature=0.0, max_new_tokens=12)),
            ("What colour is it?", BLUE, dict(temperature=0.8, top_p=0.9, seed=77, max_new_tokens=9)),
            ("Name one thing.", RED, dict(temperature=0.0, repetition_penalty=1.2, max_new_tokens=5)),
            ("Say more.", BLUE, dict(temperature=0.7, seed=5, max_new_tokens=14))]


def ask(base: str, text, color, settings, stream: bool):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    options = dict(max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                   **{k: settings[k] for k in ("top_p", "seed") if k in settings})
    extra = {"repetition_penalty": settings["repetition_penalty"]} if "repetition_penalty" in settings else None
    if not stream:
        reply = client.chat.completions.create(model="tiny", messages=messages(text, color), extra_body=extra,
                                               **options)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages(text, color), extra_body=extra,
                                                 stream=True, stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens


def test_answers_equal_the_engine_alone_and_concurrent(server, engine):
    expected = [direct(engine, text, color, **settings) for text, color, settings in REQUESTS]
    for (text, color, settings), want in zip(REQUESTS, expected):
        for stream in (False, True):
            assert ask(server, text, color, settings, stream) == (want.text, want.finish_reason,
                                                                 len(want.token_ids)), (text, stream)
    jobs = [(index, stream) for index in range(len(REQUESTS)) for stream in (False, True)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(server, *REQUESTS[job[0]], job[1]), jobs))
    for (index, stream), answer in zip(jobs, answers):
        want = expected[index]
        assert answer == (want.text, want.finish_reason, len(want.token_ids)), (index, stream)
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok"
    assert health["scheduler"]["requests"] >= 8 + len(jobs)  # the engine process's own counters
    assert health["scheduler"]["slots_in_use"] == 0 and health["scheduler"]["failed_batches"] == 0


def test_a_client_that_leaves_frees_its_row(server):
    before = httpx.get(server + "/health").json()["scheduler"]
    body = {"model": "tiny", "messages": messages("Describe the image.", RED), "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for index, _ in enumerate(response.iter_lines()):
            if index >= 3:
                break  # leave after the first pieces of a long answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        scheduler = httpx.get(server + "/health").json()["scheduler"]
        if scheduler["slots_in_use"] == 0:
            break
        time.sleep(0.1)
    # the answer (up to the whole context) was cut short: its row ended and was counted
    assert scheduler["slots_in_use"] == 0 and scheduler["requests"] == before["requests"] + 1
    assert scheduler["generated_tokens"] - before["generated_tokens"] < 1000


def engine_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    if not children.exists():
        pytest.skip("needs Linux's /proc/<pid>/task/<pid>/children")
    pids = [int(p) for p in children.read_text().split()]
    engines = [p for p in pids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert len(engines) == 1, pids
    return engines[0]


def test_the_server_reports_a_dead_engine_process_and_exits(tmp_path_factory):
    process, base = start(tmp_path_factory, "dead_engine")
    try:
        os.kill(engine_pid(process.pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = httpx.get(base + "/health")
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health.status_code == 503
        assert "engine process ended unexpectedly" in health.json()["reason"]
        refused = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": messages("hi", RED)})
        assert refused.status_code == 503 and "restart" in refused.json()["error"]["message"]
        assert process.wait(timeout=30) == FATAL_EXIT_CODE
    finally:
        if process.poll() is None:
            stop_process(process)


def test_a_batch_crosses_the_pipe_unchanged():
    batch = BatchCollateOutput(sft_format=["<|User|>: hi"], input_ids=torch.arange(7).reshape(1, 7),
                               labels=torch.full((1, 7), -100), images=torch.randn(1, 3, 3, 8, 8).bfloat16(),
                               attention_mask=torch.ones(1, 7, dtype=torch.bool),
                               images_seq_mask=torch.tensor([[False, True, True, False, False, True, False]]),
                               images_spatial_crop=torch.zeros(1, 0, 2, dtype=torch.long), seq_lens=[7])
    receiving, sending = multiprocessing.Pipe(duplex=False)
    header, payloads = wire_header(batch)

    def send():
        sending.send(header)
        for payload in payloads:
            write_payload(sending.fileno(), payload)

    thread = threading.Thread(target=send)  # past the pipe's buffer: the reader must read while it writes
    thread.start()
    got = read_batch(receiving, receiving.recv(), pin=False)
    thread.join()
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        else:
            assert got[name] == value, name
    big = torch.randn(1, 40, 3, 64, 64).bfloat16()  # 983 KB: many pipe buffers
    batch.images = big
    header, payloads = wire_header(batch)
    thread = threading.Thread(target=send)
    thread.start()
    assert torch.equal(read_batch(receiving, receiving.recv(), pin=False).images, big)
    thread.join()


def test_the_command_line_refuses_static_batching_with_an_engine_process(tmp_path_factory):
    result = subprocess.run([sys.executable, "-m", "deepseek_vl2.serve", "--model_path",
                             str(tiny_checkpoint(tmp_path_factory)), "--device", "cpu", "--engine-process",
                             "--scheduler", "static"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode != 0 and "--engine-process serves with the continuous engine" in result.stderr


def test_the_engine_process_protocol_without_http(tmp_path_factory, engine):
    """EngineProcess as the app uses it, on one event loop: a job answers as the engine does; a job
    cancelled before it is submitted ends "cancelled" (its cancel may reach the other process first);
    /health's counters come from there; closing fails nothing that ended and stops the process."""
    import asyncio
    import functools

    from deepseek_vl2.engine import PrefillSettings
    from deepseek_vl2.serve.engine_process import EngineProcess, checkpoint_engine
    from deepseek_vl2.serve.scheduler import Job

    checkpoint = str(tiny_checkpoint(tmp_path_factory))
    build = functools.partial(checkpoint_engine, checkpoint, "cpu", "float32", None, 2, PrefillSettings())
    remote = EngineProcess(build, engine.processor)
    text, color, settings = REQUESTS[1]
    want = direct(engine, text, color, **settings)
    conversation = [{"role": "<|User|>", "content": "<image>\n" + text}, {"role": "<|Assistant|>", "content": ""}]

    async def run():
        remote.start()
        loop = asyncio.get_running_loop()
        sample = remote.prepare_one(conversation, [Image.new("RGB", (64, 48), color)])
        answered = Job(sample, GenerationParams(**settings), loop, streams=True)
        early = Job(remote.prepare_one(conversation, [Image.new("RGB", (64, 48), color)]),
                    GenerationParams(max_new_tokens=500, temperature=0), loop, streams=False)
        early.cancel()
        await asyncio.to_thread(remote.submit, early)
        await asyncio.to_thread(remote.submit, answered)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await asyncio.wait_for(answered.events.get(), 60))
        kind, result = await asyncio.wait_for(early.events.get(), 60)
        return events, kind, result

    try:
        events, kind, cancelled = asyncio.run(run())
        assert remote.events_sent_at <= time.monotonic()  # the engine's thread stamps what it sends
        assert remote.alive
        stats = remote.stats
        sent = []
        remote._send_control = sent.append
        remote.cancel(0)  # the app cancels every job once it has ended: nothing goes over for an ended one
        assert sent == []
    finally:
        del remote._send_control
        remote.close()
    assert events[-1][0] == "done" and events[-1][1].text == want.text and events[-1][1].token_ids == want.token_ids
    assert "".join(value for kind_, value in events if kind_ == "text") == want.text
    assert kind == "done" and cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 500
    assert stats.requests == 2 and stats.slots_in_use == 0
    assert not remote.alive and remote.process.exitcode == 0
    assert stopped_reason(remote) == "the engine process has been closed"


def test_health_names_an_engine_process_that_died_before_the_loop_read_its_pipe(tmp_path_factory, engine):
    """/health may find the process gone (its exit reaped) before the event loop reads the pipe's end
    that sets the server's fatal reason: its reason is the process's end all the same."""
    import functools

    from deepseek_vl2.engine import PrefillSettings
    from deepseek_vl2.serve.engine_process import EngineProcess, checkpoint_engine

    build = functools.partial(checkpoint_engine, str(tiny_checkpoint(tmp_path_factory)), "cpu", "float32", None, 2,
                              PrefillSettings())
    remote = EngineProcess(build, engine.processor)  # not started: no loop reads its events
    try:
        os.kill(remote.process.pid, signal.SIGKILL)
        remote.process.join(30)
        assert not remote.alive
        assert stopped_reason(remote) == f"the engine process ended unexpectedly (exit code {-signal.SIGKILL})"
    finally:
        remote.close()


def test_an_engine_that_cannot_be_built_is_a_clear_start_up_error(tmp_path, engine):
    import functools

    from deepseek_vl2.engine import PrefillSettings
    from deepseek_vl2.serve.engine_process import EngineProcess, checkpoint_engine

    missing = tmp_path / "no_checkpoint_here"
    build = functools.partial(checkpoint_engine, str(missing), "cpu", "float32", None, 2, PrefillSettings())
    with pytest.raises(RuntimeError, match="the engine process could not build its engine: .*no_checkpoint_here"):
        EngineProcess(build, engine.processor)


class Interrupted(BaseException):
    """What Ctrl-C raises in the server's process while the model loads."""


def test_an_interrupted_start_up_ends_the_engine_process(monkeypatch):
    from types import SimpleNamespace

    from deepseek_vl2.serve.engine_process import EngineProcess

    processes = []

    def interrupted(self, timeout_s):
        processes.append(self.process)
        raise Interrupted

    monkeypatch.setattr(EngineProcess, "_wait_until_ready", interrupted)
    with pytest.raises(Interrupted):
        EngineProcess(functools.partial(time.sleep, 600), SimpleNamespace(tokenizer=None))  # a build that loads long
    assert not processes[0].is_alive() and processes[0].exitcode == -signal.SIGKILL


PARENT_OF_A_LOADING_ENGINE = """
import functools, multiprocessing, threading, time, types
from deepseek_vl2.serve.engine_process import EngineProcess

def report():
    time.sleep(1)
    print(*[child.pid for child in multiprocessing.active_children()], flush=True)

if __name__ == "__main__":
    threading.Thread(target=report, daemon=True).start()
    EngineProcess(functools.partial(time.sleep, 600), types.SimpleNamespace(tokenizer=None))
"""


def test_the_engine_process_ends_with_a_server_killed_while_it_loads(tmp_path):
    """A server killed (SIGTERM, SIGKILL) while its engine's process still loads the model leaves no
    orphan holding the GPU: the engine's process notices and ends."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_OF_A_LOADING_ENGINE)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        child = int(parent.stdout.readline().split()[0])
    finally:
        parent.kill()
        parent.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"the engine process {child} outlived its killed server")
