"""The continuous engine in a process of its own (serve/engine_process.py): a server on it answers as
one with the engine on a thread, cancels, counts, and turns unhealthy when the engine process dies."""
import functools
import os
import signal
import time

import httpx
import pytest
import torch

from deepseek_vl2.engine import ChatEngine, PrefillSettings
from deepseek_vl2.models import DeepseekVLV2Processor
from deepseek_vl2.serve.app import create_app
from deepseek_vl2.serve.engine_process import EngineProcess, checkpoint_engine
from deepseek_vl2.serve.settings import ServerSettings
from goldens import CHECKPOINTS
from serve_helpers import ServerThread, data_url, png_bytes

CHECKPOINT = str(CHECKPOINTS["tiny_mha"])
SETTINGS = ServerSettings(model_id="tiny", scheduler="continuous", max_num_seqs=4)


def engine_process() -> EngineProcess:
    build = functools.partial(checkpoint_engine, CHECKPOINT, "cpu", "float32", None, 4, PrefillSettings())
    return EngineProcess(build, DeepseekVLV2Processor.from_pretrained(CHECKPOINT))


def bodies():
    picture = data_url(png_bytes((120, 90), (10, 200, 40)))
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                               {"type": "image_url", "image_url": {"url": picture}}]}]
    return [{"messages": with_image, "max_tokens": 8, "temperature": 0},
            {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 12, "temperature": 0.8,
             "seed": 7},
            {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 10, "temperature": 0,
             "stream": True}]


def answer(base: str, body: dict) -> str:
    if not body.get("stream"):
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]
    pieces = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                import json

                pieces += [choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"]]
    return "".join(pieces)


@pytest.fixture(scope="module")
def here():
    """Answers of a server whose engine runs on a thread."""
    engine = ChatEngine.load(CHECKPOINT, device="cpu", dtype=torch.float32)
    with ServerThread(create_app(engine, SETTINGS)) as running:
        return [answer(running.base, body) for body in bodies()]


def test_a_server_on_an_engine_process_answers_as_on_an_engine_thread(here):
    with ServerThread(create_app(engine_process(), SETTINGS)) as running:
        there = [answer(running.base, body) for body in bodies()]
        health = httpx.get(running.base + "/health").json()
    assert there == here and all(there)
    assert health["status"] == "ok" and health["scheduler"]["requests"] == 3
    assert health["scheduler"]["slots_in_use"] == 0 and health["scheduler"]["generated_tokens"] > 0


def test_a_cancelled_request_frees_its_slot_in_the_engine_process():
    with ServerThread(create_app(engine_process(), SETTINGS)) as running:
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", running.base + "/v1/chat/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first piece of text: leave
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scheduler = httpx.get(running.base + "/health").json()["scheduler"]
            if scheduler["requests"] == 1:
                break
            time.sleep(0.1)
        assert scheduler["requests"] == 1 and scheduler["slots_in_use"] == 0
        assert scheduler["generated_tokens"] < 2000


def test_a_dead_engine_process_makes_the_server_unhealthy():
    engine, ended = engine_process(), []
    with ServerThread(create_app(engine, SETTINGS, on_fatal=ended.append)) as running:
        os.kill(engine.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not ended and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ended and "engine process ended unexpectedly" in ended[0]
        health = httpx.get(running.base + "/health")
        assert health.status_code == 503 and "engine process" in health.json()["reason"]
        reply = httpx.post(running.base + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_unhealthy"


def test_an_engine_that_cannot_be_built_is_reported():
    build = functools.partial(checkpoint_engine, "/nonexistent/checkpoint", "cpu", "float32", None, 4,
                              PrefillSettings())
    with pytest.raises(RuntimeError, match="could not build its engine"):
        EngineProcess(build, DeepseekVLV2Processor.from_pretrained(CHECKPOINT))
