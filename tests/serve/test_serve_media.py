"""Remote media without the network: the resolver and the transport are replaced. Only public
addresses are fetched, checked after resolution and again at every redirect, the connection goes
to the checked address, and the whole download has a deadline and a size cap."""
import asyncio
import ipaddress

import httpx
import pytest

from deepseek_vl2.serve import media
from deepseek_vl2.serve.errors import APIError
from serve_helpers import png_bytes

PUBLIC, PUBLIC_V6 = "93.184.216.34", "2606:2800:220:1::1"
DNS = {"img.example": [PUBLIC], "v6.example": [PUBLIC_V6], "inner.example": ["10.0.0.7"],
       "mixed.example": [PUBLIC, "127.0.0.1"], "mapped.example": ["::ffff:169.254.169.254"],
       "meta.example": ["169.254.169.254"], "zero.example": ["0.0.0.0"]}
IMAGE = png_bytes()


@pytest.mark.parametrize("address,public", [
    (PUBLIC, True), (PUBLIC_V6, True), ("::ffff:93.184.216.34", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.251", False), ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False),
    ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False),
    ("2001:db8::1", False)])
def test_public_address(address, public):
    assert media.public_address(address) is public


class Web:
    """The replaced network: answers by path, records the requests."""

    def __init__(self):
        self.requests = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/cat.png":
            return httpx.Response(200, content=IMAGE)
        if path.startswith("/redirect/"):
            return httpx.Response(302, headers={"Location": path[len("/redirect/"):].replace("|", "/")})
        if path == "/loop":
            return httpx.Response(302, headers={"Location": "/loop"})
        if path == "/big":
            return httpx.Response(200, content=b"x" * 10_000)
        if path == "/big-undeclared":
            async def chunks():
                for _ in range(100):
                    yield b"x" * 1000
            return httpx.Response(200, content=chunks())
        if path == "/stall":  # an image host that never answers
            await asyncio.sleep(60)
        if path == "/slow":
            async def trickle():
                for _ in range(100):
                    await asyncio.sleep(0.05)  # each read is quick; the whole download is not
                    yield b"x"
            return httpx.Response(200, content=trickle())
        return httpx.Response(404)


@pytest.fixture
def web(monkeypatch):
    async def resolve(host, port):
        if host in DNS:
            return DNS[host]
        try:
            return [str(ipaddress.ip_address(host))]  # a literal address resolves to itself
        except ValueError:
            pass
        raise OSError(f"unknown host {host}")

    monkeypatch.setattr(media, "resolve_host", resolve)
    return Web()


def fetch(web, url, max_bytes=5_000):
    loader = media.MediaLoader(None, True, 1_000_000, max_bytes, transport=httpx.MockTransport(web.handle))
    return asyncio.run(loader.read(url, "messages[0].content[0].image_url"))


def refused(web, url, code, **kwargs):
    with pytest.raises(APIError) as raised:
        fetch(web, url, **kwargs)
    assert raised.value.status == 400 and raised.value.code == code, raised.value.message
    assert raised.value.param == "messages[0].content[0].image_url"
    return raised.value.message


def test_a_public_host_is_fetched_from_the_checked_address(web):
    assert fetch(web, "http://img.example/cat.png") == IMAGE
    request = web.requests[-1]
    assert request.url.host == PUBLIC and request.headers["host"] == "img.example"
    assert fetch(web, "https://v6.example:8443/cat.png") == IMAGE
    request = web.requests[-1]
    assert request.url.host == PUBLIC_V6 and request.headers["host"] == "v6.example:8443"
    assert request.extensions["sni_hostname"] == "v6.example"


@pytest.mark.parametrize("url", ["http://inner.example/cat.png", "http://mixed.example/cat.png",
                                 "http://mapped.example/cat.png", "http://meta.example/latest/meta-data",
                                 "http://zero.example/cat.png", "http://10.0.0.1/cat.png", "http://[::1]/cat.png",
                                 "http://[::ffff:7f00:1]/cat.png"])
def test_private_targets_are_refused_before_any_request(web, url):
    refused(web, url, "remote_media_forbidden")
    assert web.requests == []


def test_redirects_are_checked_each_time_and_limited(web):
    refused(web, "http://img.example/redirect/http:||inner.example|cat.png", "remote_media_forbidden")
    refused(web, "http://img.example/redirect/http:||127.0.0.1|cat.png", "remote_media_forbidden")
    assert [r.url.host for r in web.requests] == [PUBLIC, PUBLIC]  # the private targets were never asked
    assert fetch(web, "http://img.example/redirect/http:||v6.example|cat.png") == IMAGE
    assert web.requests[-1].url.host == PUBLIC_V6
    assert "redirects" in refused(web, "http://img.example/loop", "image_fetch_failed")
    refused(web, "http://img.example/redirect/file:|||etc|passwd", "invalid_image_url")


def test_the_whole_download_has_a_deadline_and_a_size_cap(web, monkeypatch):
    refused(web, "http://img.example/big", "image_too_large")
    refused(web, "http://img.example/big-undeclared", "image_too_large")
    monkeypatch.setattr(media, "REMOTE_DEADLINE_S", 0.5)
    assert "longer than" in refused(web, "http://img.example/slow", "image_fetch_failed")
    refused(web, "http://nowhere.example/cat.png", "image_fetch_failed")


def test_images_in_flight_hold_no_place_among_the_preparations(web, monkeypatch, tmp_path_factory):
    """A request whose image host does not answer waits for it without holding one of the places for
    decoding and tiling (here the only one): a text-only request beside it is answered at once, and
    the stalled one gets 504 at its request timeout (3 s), not at the download's own deadline (20 s)."""
    import threading
    import time

    import torch

    from deepseek_vl2.engine import ChatEngine
    from deepseek_vl2.serve import app as app_module
    from deepseek_vl2.serve.settings import ServerSettings
    from serve_helpers import ServerThread, tiny_checkpoint

    monkeypatch.setattr(app_module, "PREPARING_AT_ONCE", 1)
    engine = ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)
    settings = ServerSettings(model_id="tiny", allow_remote_media=True, request_timeout_s=3.0, scheduler="continuous",
                              max_num_seqs=2)
    app = app_module.create_app(engine, settings)
    app.state.media.transport = httpx.MockTransport(web.handle)
    stalled = {}
    image = {"type": "image_url", "image_url": {"url": "http://img.example/stall"}}
    with ServerThread(app) as server:
        def post(content):
            started = time.monotonic()
            response = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                                  json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
            return response, time.monotonic() - started

        waiting = threading.Thread(target=lambda: stalled.update(zip(("response", "took"), post([image]))))
        waiting.start()
        time.sleep(0.5)
        answered, took = post("Hello")
        waiting.join(60)
    assert answered.status_code == 200 and took < 2.0, (answered.text, took)
    assert stalled["response"].status_code == 504 and stalled["response"].json()["error"]["code"] == "timeout"
    assert 2.5 < stalled["took"] < 10


def test_an_image_far_over_the_pixel_limit_names_the_servers_limit(monkeypatch):
    """Past twice the limit Pillow refuses the image itself (the server sets its limit from
    --max-image-pixels), with a message naming twice the limit: the error names the server's."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    loader = media.MediaLoader(None, False, 1000, 5_000_000)
    with pytest.raises(APIError) as raised:
        loader.decode(png_bytes((1024, 768)), "messages[0].content[0].image_url")
    assert raised.value.code == "image_too_large"
    assert raised.value.message.endswith("more pixels than this server's limit of 1000"), raised.value.message
