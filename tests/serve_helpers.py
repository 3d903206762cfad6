"""Shared by the server and demo tests: the tiny offline checkpoint (made once per session), free
ports, image data: URLs, and starting a server as a subprocess or in a thread."""
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_checkpoints = {}


def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint, written once per test session."""
    if "tiny" not in _checkpoints:
        from deepseek_vl2.offline_checkpoint import make_offline_checkpoint

        _checkpoints["tiny"] = make_offline_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", variant="tiny")
    return _checkpoints["tiny"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wait_until_up(url: str, process=None, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def start_process(args, health_path: str, log_path: Path):
    """Run `python args...` from the repository root; returns (process, base URL) once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base + health_path, process)
    except Exception:
        stop_process(process)
        raise RuntimeError(f"{args} did not start; its log:\n{log_path.read_text()}") from None
    return process, base


def stop_process(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ServerThread:
    """A uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_until_up(self.base + "/health")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
