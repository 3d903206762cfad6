"""The OpenAI-compatible server (`python -m deepseek_vl2.serve`), run as a subprocess on the tiny offline
checkpoint and spoken to with the real `openai` client and with raw HTTP: answers equal a direct
ChatEngine call, bad requests get a 4xx JSON error, local files outside the allowed directory are
never read, and the server stays up."""
import base64
import functools
import http.server
import io
import json
import os
import re
import threading

import httpx
import openai
import pytest
import torch
from PIL import Image

from deepseek_vl2.engine import BatchRow, ChatEngine, ChatResult, GenerationParams
from deepseek_vl2.grounding import GroundedBox
from deepseek_vl2.serve import media as media_module
from deepseek_vl2.serve.app import create_app
from deepseek_vl2.serve.app_modules import utils
from deepseek_vl2.serve.responses import Completion
from deepseek_vl2.serve.settings import ServerSettings
from serve_helpers import ServerThread, data_url, png_bytes, start_process, stop_process, tiny_checkpoint

RED = (200, 30, 30)
MAX_IMAGE_PIXELS = 1_000_000
MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An allowed directory with an image, symlinks from it to outside files, and outside files: a real
    image (served if a link were followed) and a FIFO (opening it would hang the request)."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "inside.png").write_bytes(png_bytes((80, 60), (20, 120, 220)))
    (outside / "secret.png").write_bytes(png_bytes((80, 60), (250, 250, 0)))
    os.mkfifo(outside / "fifo")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "fifo_link").symlink_to(outside / "fifo")
    return allowed, outside


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    checkpoint = tiny_checkpoint(tmp_path_factory)
    args = ["-m", "deepseek_vl2.serve", "--model_path", str(checkpoint), "--device", "cpu", "--dtype", "float32",
            "--allowed-local-media-path", str(media[0]), "--max-images", "2", "--max-batch-size", "4",
            "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    process, base = start_process(args, "/health", tmp_path_factory.mktemp("logs") / "server.log")
    yield base
    stop_process(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_message(text: str, url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def direct(engine, text, images, **settings):
    conversation = [{"role": "<|User|>", "content": "<image>\n" * len(images) + text},
                    {"role": "<|Assistant|>", "content": ""}]
    return engine.chat(conversation, images, GenerationParams(**settings))


SETTINGS = [dict(temperature=0.0, top_p=1.0), dict(temperature=0.7, top_p=0.9, seed=1234)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "seeded"])
def test_chat_equals_engine(client, engine, settings):
    image = Image.new("RGB", (64, 48), RED)
    expected = direct(engine, "Describe the image.", [image], max_new_tokens=12, repetition_penalty=1.1, **settings)
    reply = client.chat.completions.create(model="tiny", messages=image_message("Describe the image.",
                                                                                 data_url(png_bytes(color=RED))),
                                           max_tokens=12, **settings)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids) == 12
    assert reply.usage.total_tokens == expected.prompt_tokens + 12


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "seeded"])
def test_streaming_equals_engine(client, engine, settings):
    image = Image.new("RGB", (64, 48), RED)
    expected = direct(engine, "What is this?", [image], max_new_tokens=10, repetition_penalty=1.1, **settings)
    stream = client.chat.completions.create(model="tiny", messages=image_message("What is this?",
                                                                                 data_url(png_bytes(color=RED))),
                                            max_completion_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **settings)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_a_server_prefilling_on_another_device_answers_as_the_engine(tmp_path_factory, engine):
    """`--prefill-device` (here the CPU beside a CPU model: the same thread hand-over as with a second
    GPU): streamed and whole answers equal the engine's, and /health says the prompts went there."""
    args = ["-m", "deepseek_vl2.serve", "--model_path", str(tiny_checkpoint(tmp_path_factory)), "--device", "cpu",
            "--dtype", "float32", "--prefill-device", "cpu"]
    process, base = start_process(args, "/health", tmp_path_factory.mktemp("logs") / "remote.log")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        expected = direct(engine, "What is this?", [Image.new("RGB", (64, 48), RED)], max_new_tokens=8, temperature=0)
        messages = image_message("What is this?", data_url(png_bytes(color=RED)))
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert reply.choices[0].message.content == streamed == expected.text
        health = httpx.get(base + "/health").json()["scheduler"]
        assert health["requests"] == 2 and health["whole_prefills"] == health["layer_pieces"] == 0
    finally:
        stop_process(process)


def test_stop_strings_system_and_history_follow_the_engine(client, engine):
    history = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
               {"role": "user", "content": "Tell me more."}]
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "<|User|>", "content": "Hello"},
                    {"role": "<|Assistant|>", "content": "Hi there."}, {"role": "<|User|>", "content": "Tell me more."},
                    {"role": "<|Assistant|>", "content": ""}]
    full = engine.chat(conversation, [], GenerationParams(max_new_tokens=16, temperature=0))
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"no usable stop string in {full.text!r}"
    expected = engine.chat(conversation, [], GenerationParams(max_new_tokens=16, temperature=0, stop=[stop]))
    reply = client.chat.completions.create(model="tiny", messages=history, max_tokens=16, temperature=0, stop=stop)
    assert reply.choices[0].message.content == expected.text == full.text[:full.text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == full.prompt_tokens


def test_concurrent_requests_equal_single_answers(server, engine):
    """Concurrent greedy requests (batched by the server) answer as each would alone."""
    colors = [(200, 30, 30), (20, 200, 30), (20, 30, 200), (120, 120, 120)]
    replies = [None] * len(colors)

    def ask(index):
        url = data_url(png_bytes(color=colors[index]))
        body = {"model": "tiny", "messages": image_message(f"Picture {index}?", url),
                "max_tokens": 6 + 2 * index, "temperature": 0}
        replies[index] = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(colors))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, color in enumerate(colors):
        expected = direct(engine, f"Picture {index}?", [Image.new("RGB", (64, 48), color)],
                          max_new_tokens=6 + 2 * index, temperature=0)
        assert replies[index]["choices"][0]["message"]["content"] == expected.text
        assert replies[index]["usage"]["completion_tokens"] == 6 + 2 * index


def test_concurrent_mixed_requests_with_the_openai_client_equal_single_answers(client, engine):
    """Through the continuous engine (the server's default): greedy and seeded sampled requests, a stop
    string, different max_tokens, streamed and not, all at once, each give what it gives alone."""
    full = direct(engine, "Say something long.", [], max_new_tokens=16, temperature=0)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"no usable stop string in {full.text!r}"
    red, blue = data_url(png_bytes(color=RED)), data_url(png_bytes(color=(20, 30, 200)))
    cases = [  # (text, image colour or None, settings, streamed)
        ("Picture one?", RED, dict(max_new_tokens=10, temperature=0.0, top_p=1.0), False),
        ("Tell a tale.", None, dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5), True),
        ("Say something long.", None, dict(max_new_tokens=16, temperature=0.0, top_p=1.0, stop=[stop]), False),
        ("Picture two?", (20, 30, 200), dict(max_new_tokens=7, temperature=0.6, top_p=0.8, seed=9), False),
        ("Count.", None, dict(max_new_tokens=20, temperature=0.0, top_p=1.0), True),
    ]
    replies = [None] * len(cases)

    def ask(index):
        text, colour, settings, streamed = cases[index]
        url = {RED: red, (20, 30, 200): blue}.get(colour)
        messages = image_message(text, url) if url else [{"role": "user", "content": text}]
        options = dict(model="tiny", messages=messages, max_tokens=settings["max_new_tokens"],
                       temperature=settings["temperature"], top_p=settings["top_p"], seed=settings.get("seed"),
                       stop=settings.get("stop"))
        if not streamed:
            reply = client.chat.completions.create(**options)
            replies[index] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
            return
        pieces, reason = [], None
        for chunk in client.chat.completions.create(**options, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        replies[index] = ("".join(pieces), reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (text, colour, settings, _), reply in zip(cases, replies):
        images = [Image.new("RGB", (64, 48), colour)] if colour else []
        expected = direct(engine, text, images, **settings)
        assert reply == (expected.text, expected.finish_reason), text


def test_engine_batch_equals_single_rows(engine):
    """chat_batch (the continuous engine) and generate_batch (one left-padded batch): rows of different
    lengths, images and max_new_tokens give each row's single answer; chat_batch also takes rows with
    different settings and seeds, generate_batch refuses seeded rows together."""
    cases = [("Describe the image.", [Image.new("RGB", (64, 48), RED)], 9),
             ("Hello, who are you?", [], 5),
             ("Compare them.", [Image.new("RGB", (300, 500), (0, 90, 0)), Image.new("RGB", (900, 300), (0, 0, 255))],
              7)]
    singles = [direct(engine, text, images, max_new_tokens=n, temperature=0) for text, images, n in cases]
    rows = []
    for text, images, n in cases:
        conversation = [{"role": "<|User|>", "content": "<image>\n" * len(images) + text},
                        {"role": "<|Assistant|>", "content": ""}]
        params = GenerationParams(max_new_tokens=n, temperature=0)
        rows.append(BatchRow(engine.prepare_one(conversation, images), params))
    batched = engine.chat_batch(rows)
    assert [r.text for r in batched] == [s.text for s in singles]
    assert [r.token_ids for r in batched] == [s.token_ids for s in singles]
    assert [r.prompt_tokens for r in batched] == [s.prompt_tokens for s in singles]
    # rows with their own settings and seeds, in one call (the continuous engine)
    mixed = [BatchRow(rows[0].sample, GenerationParams(max_new_tokens=6, temperature=0.5, seed=1)),
             BatchRow(rows[1].sample, GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.7, seed=2)),
             rows[2]]
    alone = [engine.generate_batch([row])[0] for row in mixed]
    assert [r.token_ids for r in engine.chat_batch(mixed)] == [r.token_ids for r in alone]
    # one left-padded generate batch: one set of settings, a seeded row alone
    assert [r.token_ids for r in engine.generate_batch(rows)] == [s.token_ids for s in singles]
    with pytest.raises(ValueError, match="seed"):
        engine.generate_batch([mixed[0], BatchRow(rows[1].sample, mixed[0].params)])
    with pytest.raises(ValueError, match="share temperature"):
        engine.generate_batch(mixed[:2])


def test_models_and_health(server):
    models = httpx.get(server + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    scheduler = health["scheduler"]
    assert scheduler["requests"] >= 0 and scheduler["waiting"] == 0
    # the continuous engine on the CPU: no graphs of any kind; its prefill counters are there
    assert (scheduler["decode_graphs"], scheduler["prompt_graphs"], scheduler["tower_graphs"],
            scheduler["steps_without_graph"]) == (0, 0, 0, 0)
    assert all(scheduler[name] >= 0 for name in ("whole_prefills", "tower_pieces", "layer_pieces"))


def test_grounding_boxes_are_returned_with_pixels():
    images = [Image.new("RGB", (100, 50)), Image.new("RGB", (999, 1998))]

    result = ChatResult(text="<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>", token_ids=[1, 2], prompt_tokens=5,
                        finish_reason="stop", boxes=[GroundedBox("cat", (0, 0, 999, 499))])
    body = Completion("tiny", [image.size for image in images]).body(result)
    assert body["choices"][0]["message"]["grounding"] == [
        {"label": "cat", "box": [0, 0, 999, 499], "box_pixels": [0, 0, 999, 998], "image_index": 1}]
    plain = Completion("tiny", [image.size for image in images]).body(ChatResult("plain", [1], 5, "stop"))
    assert "grounding" not in plain["choices"][0]["message"]


@pytest.mark.parametrize("piece", ["a", " hello", '"quoted" \\ back\nslash', "\x00piece\x00", "漢字 é \u2028", ""])
def test_a_text_chunk_is_the_chunk_of_its_content(piece):
    completion = Completion("tiny", [(640, 480)])
    assert completion.text_chunk(piece) == completion.chunk({"content": piece})
    assert json.loads(completion.text_chunk(piece)[len("data: "):])["choices"][0]["delta"] == {"content": piece}


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BOMB_PNG = encoded(Image.new("1", (20000, 20000)))  # a few kilobytes; decoded, 400 megapixels
NOISE_PNG = encoded(Image.effect_noise((300, 300), 60))


def user(text="hi"):
    return [{"role": "user", "content": text}]


BAD_REQUESTS = [
    ("malformed_json", b'{"messages": [', 400, None, "invalid_json"),
    ("not_an_object", b"[1, 2]", 400, None, "invalid_json"),
    ("missing_messages", {"model": "tiny"}, 400, "messages", "missing_messages"),
    ("empty_messages", {"messages": []}, 400, "messages", "empty_messages"),
    ("tool_role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ("assistant_last", {"messages": user() + [{"role": "assistant", "content": "x"}]}, 400, "messages", "invalid_role"),
    ("system_later", {"messages": user() + [{"role": "system", "content": "x"}]}, 400, "messages[1].role",
     "invalid_role"),
    ("bad_content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("bad_part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     "messages[0].content[0]", None),
    ("bad_base64", {"messages": image_message("x", "data:image/png;base64,@@not base64@@")}, 400,
     "messages[0].content[0].image_url", "invalid_base64"),
    ("not_data_url", {"messages": image_message("x", "data:image/png,rawbytes")}, 400,
     "messages[0].content[0].image_url", "invalid_image_url"),
    ("unreadable_image", {"messages": image_message("x", data_url(b"this is not an image"))}, 400,
     "messages[0].content[0].image_url", "invalid_image"),
    ("truncated_image", {"messages": image_message("x", data_url(NOISE_PNG[:len(NOISE_PNG) // 2]))}, 400,
     "messages[0].content[0].image_url", "invalid_image"),
    ("oversized_image", {"messages": image_message("x", data_url(png_bytes((1200, 1000))))}, 400,
     "messages[0].content[0].image_url", "image_too_large"),
    ("decompression_bomb", {"messages": image_message("x", data_url(BOMB_PNG))}, 400,
     "messages[0].content[0].image_url", "image_too_large"),
    ("too_many_images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}} for _ in range(3)]}]}, 400, "messages",
     "too_many_images"),
    ("more_tags_than_images", {"messages": user("<image> and <image>")}, 400, "messages[0].content",
     "image_tag_mismatch"),
    ("remote_media_off", {"messages": image_message("x", "https://example.com/cat.png")}, 400,
     "messages[0].content[0].image_url", "remote_media_disabled"),
    ("prompt_beyond_context", {"messages": user("word " * 5000)}, 400, "messages", "context_length_exceeded"),
    ("n", {"messages": user(), "n": 2}, 400, "n", "unsupported_parameter"),
    ("tools", {"messages": user(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ("logprobs", {"messages": user(), "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("response_format", {"messages": user(), "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("temperature_type", {"messages": user(), "temperature": "hot"}, 400, "temperature", None),
    ("temperature_range", {"messages": user(), "temperature": 3}, 400, "temperature", None),
    ("max_tokens_zero", {"messages": user(), "max_tokens": 0}, 400, "max_tokens", None),
    ("stop_type", {"messages": user(), "stop": [1, 2]}, 400, "stop", None),
    ("unknown_model", {"messages": user(), "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("body_too_large", {"messages": user("x" * (MAX_REQUEST_BYTES + 10))}, 413, None, "request_too_large"),
]


@pytest.mark.parametrize("body,status,param,code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_json_errors(server, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps({"max_tokens": 4, **body}).encode()
    response = httpx.post(server + "/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert " object at 0x" not in error["message"]  # no repr of the server's objects
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_unknown_route_and_method_are_json(server):
    assert httpx.get(server + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = httpx.get(server + "/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    assert raised.value.status_code == 400 and "'n'" in raised.value.message


def file_url(path) -> str:
    return "file://" + str(path)


def test_local_files_outside_the_allowed_directory_are_refused(server, media):
    allowed, outside = media
    attempts = ["file:///etc/passwd", file_url(outside / "secret.png"), file_url(allowed) + "/../outside/secret.png",
                file_url(allowed) + "/%2e%2e/outside/secret.png", file_url(allowed) + "/../outside/fifo",
                file_url(allowed / "link.png"), file_url(allowed / "fifo_link"), "file://localhost/etc/passwd"]
    for url in attempts:
        # a read of the FIFO would block the request, so the timeout also proves nothing was opened
        response = httpx.post(server + "/v1/chat/completions", json={"messages": image_message("x", url)}, timeout=15)
        assert response.status_code == 403, (url, response.text)
        assert response.json()["error"]["code"] == "local_media_forbidden"
        assert "root:" not in response.text
    response = httpx.post(server + "/v1/chat/completions", json={"messages": image_message("x", "file://etc/passwd")},
                          timeout=15)
    assert response.status_code == 400
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_allowed_local_file_is_used(server, client, engine, media):
    allowed, _ = media
    expected = direct(engine, "What is in the file?", [Image.open(allowed / "inside.png").convert("RGB")],
                      max_new_tokens=8, temperature=0)
    reply = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=image_message(
        "What is in the file?", file_url(allowed / "inside.png")))
    assert reply.choices[0].message.content == expected.text
    missing = httpx.post(server + "/v1/chat/completions", timeout=15,
                         json={"messages": image_message("x", file_url(allowed / "missing.png"))})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_not_found"


def test_remote_images_on_loopback_are_refused(engine, tmp_path):
    """--allow-remote-media: an image URL on a loopback HTTP server is refused (after resolution, by name or
    address, IPv4-mapped IPv6 too) and the server never sees a request; a public one (resolver and network
    replaced) is fetched from the address that was checked."""
    (tmp_path / "small.png").write_bytes(png_bytes((64, 48), (90, 20, 160)))
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            super().do_GET()

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    port = files.server_address[1]
    settings = ServerSettings(model_id="tiny", allow_remote_media=True, max_request_bytes=50_000)
    try:
        with ServerThread(create_app(engine, settings)) as running:
            def ask(url):
                return httpx.post(running.base + "/v1/chat/completions", timeout=30, json={
                    "max_tokens": 6, "temperature": 0, "messages": image_message("Which colour?", url)})

            for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1"]:
                refused = ask(f"http://{host}:{port}/small.png")
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["code"] in ("remote_media_forbidden", "image_fetch_failed")
            assert seen == []

            def public(request: httpx.Request):
                assert request.url.host == "93.184.216.34" and request.headers["host"] == "images.example"
                return httpx.Response(200, content=(tmp_path / "small.png").read_bytes())

            async def resolve(host, port):
                return ["93.184.216.34"]

            running_app = running.server.config.app
            running_app.state.media.transport = httpx.MockTransport(public)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(media_module, "resolve_host", resolve)
                expected = direct(engine, "Which colour?", [Image.new("RGB", (64, 48), (90, 20, 160))],
                                  max_new_tokens=6, temperature=0)
                reply = ask("http://images.example/small.png").json()
            assert reply["choices"][0]["message"]["content"] == expected.text
    finally:
        files.shutdown()


def test_pil_to_base64_resizes_and_labels_the_format():
    assert utils.parse_ref_bbox is not None and utils.strip_stop_words("ab<stop>c", ["<stop>"]) == "ab"
    for size, expected_size in [((1000, 500), (800, 400)), ((500, 1000), (400, 800)), ((300, 200), (300, 200)),
                                ((3000, 1000), (798, 266))]:
        tag = utils.pil_to_base64(Image.new("RGBA", size), alt='a "cat"')
        match = re.fullmatch(r'<img src="data:image/jpeg;base64,([^"]+)" alt="a &quot;cat&quot;" />', tag)
        assert match, tag[:80]
        decoded = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
        assert decoded.format == "JPEG" and decoded.size == expected_size
    png = utils.pil_to_base64(Image.new("RGB", (10, 10)), resize=False, format="PNG")
    assert png.startswith('<img src="data:image/png;base64,')
