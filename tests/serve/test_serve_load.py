"""A bounded load test of the server on loopback: 200 requests, 16 at a time, mixing good requests
(plain and streaming, greedy and sampled, with and without images), malformed ones, streaming
clients that hang up mid-answer, and injected engine faults, against the continuous engine. Nothing
may hang or fail with a 5xx other than the injected faults, every good request is answered, requests
were batched, and every KV slot is free afterwards."""
import asyncio
import json
import random
import time

import httpx
import pytest
import torch

from deepseek_vl2.engine import ChatEngine
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.serve.app import create_app
from deepseek_vl2.serve.settings import ServerSettings
from serve_helpers import ServerThread, data_url, png_bytes, tiny_checkpoint

FAULT_SEED = 666  # a request with this seed makes the engine raise (for that request alone)
REQUESTS = 200
CONCURRENCY = 16
REQUEST_TIMEOUT_S = 30.0


class FaultInjectingEngine(ContinuousEngine):
    def admit_request(self, handle, slot):
        if handle.params.seed == FAULT_SEED:
            raise RuntimeError("injected fault")
        return super().admit_request(handle, slot)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    loaded = ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)
    engine = FaultInjectingEngine(loaded.model, loaded.processor, max_num_seqs=8)
    app = create_app(engine, ServerSettings(model_id="tiny", max_batch_size=8))
    with ServerThread(app) as running:
        yield running.base


IMAGE = data_url(png_bytes(color=(10, 200, 90)))


def good_body(rng: random.Random, stream: bool) -> dict:
    content = f"Question {rng.randrange(1000)}: what do you see?"
    if rng.random() < 0.5:
        content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": content}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(2, 6),
            "stream": stream}
    body.update(rng.choice([{"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}]))
    return body


MALFORMED = [b'{"messages": [', json.dumps({"messages": []}).encode(),
             json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 4}).encode(),
             json.dumps({"messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}).encode()]


def plan(rng: random.Random) -> list:
    kinds = ["good"] * 120 + ["stream"] * 25 + ["hang_up"] * 20 + ["malformed"] * 25 + ["fault"] * 10
    assert len(kinds) == REQUESTS
    rng.shuffle(kinds)
    return kinds


async def run_one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> tuple:
    url = "/v1/chat/completions"
    if kind == "malformed":
        response = await client.post(url, content=rng.choice(MALFORMED), headers={"Content-Type": "application/json"})
        return kind, response.status_code, response.json()
    if kind == "fault":
        body = {"messages": [{"role": "user", "content": "boom"}], "max_tokens": 3, "seed": FAULT_SEED,
                "temperature": 0.5}
        response = await client.post(url, json=body)
        return kind, response.status_code, response.json()
    if kind == "good":
        body = good_body(rng, stream=False)
        response = await client.post(url, json=body)
        return kind, response.status_code, (body, response.json())
    body = good_body(rng, stream=True)
    if kind == "hang_up":
        body["max_tokens"] = 400
    events = []
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
            if kind == "hang_up" and len(events) == 2:
                break  # leave the stream: the server must drop this row
    return kind, response.status_code, (body, events)


async def load(base: str) -> list:
    rng = random.Random(5)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def bounded(kind):
            async with semaphore:
                try:
                    return await asyncio.wait_for(run_one(client, kind, rng), REQUEST_TIMEOUT_S)
                except (TimeoutError, httpx.TimeoutException):
                    return kind, "hung", None

        return await asyncio.gather(*(bounded(kind) for kind in plan(rng)))


def test_load(server):
    before = httpx.get(server + "/health").json()["scheduler"]
    started = time.monotonic()
    outcomes = asyncio.run(load(server))
    elapsed = time.monotonic() - started
    assert elapsed < 120, f"{REQUESTS} requests took {elapsed:.0f} s"

    assert [o for o in outcomes if o[1] == "hung"] == []
    for kind, status, detail in outcomes:
        if kind == "malformed":
            assert status == 400 and detail["error"]["message"]
        elif kind == "fault":
            assert status == 500 and "injected fault" in detail["error"]["message"]
        elif kind == "good":
            body, reply = detail
            assert status == 200, reply
            assert 1 <= reply["usage"]["completion_tokens"] <= body["max_tokens"]
        else:
            body, events = detail
            assert status == 200
            assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
            if kind == "stream":
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")

    deadline = time.monotonic() + 30
    while (health := httpx.get(server + "/health").json())["scheduler"]["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = health["scheduler"]
    assert health["status"] == "ok" and stats["waiting"] == 0
    while (stats := httpx.get(server + "/health").json()["scheduler"])["slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["slots_in_use"] == 0, "KV slots still held after the run"
    good = sum(1 for kind, *_ in outcomes if kind in ("good", "stream", "hang_up"))
    assert stats["requests"] - before["requests"] == good
    assert stats["failed_batches"] - before["failed_batches"] == 10
    assert stats["max_batch_size_seen"] > 1, "no two requests were ever batched"
    # 20 clients hung up on 400-token answers after one chunk; their rows must have ended early
    generated = stats["generated_tokens"] - before["generated_tokens"]
    assert generated < 20 * 400 / 4, f"{generated} tokens generated: rows of departed clients kept going"
