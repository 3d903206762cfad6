"""The server's scheduling rule: the continuous engine for a model on one device, static batching for
a model spread over several, either forced by `scheduler`; on the continuous
path a request's unrecoverable device error still makes the server unhealthy."""
import types

import httpx
import pytest
import torch

from deepseek_vl2.engine import ChatEngine, PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.prefill import Prefill
from deepseek_vl2.serve.__main__ import main, parse_args
from deepseek_vl2.serve.app import create_app
from deepseek_vl2.serve.scheduler import BatchScheduler, ContinuousScheduler, create_scheduler, uses_continuous_engine
from deepseek_vl2.serve.settings import ServerSettings
from serve_helpers import ServerThread, tiny_checkpoint

URL = "/v1/chat/completions"


class FakeEngine:
    def __init__(self, split: bool):
        self.model = types.SimpleNamespace(language=types.SimpleNamespace(is_split=split))


def test_the_rule_by_placement():
    assert uses_continuous_engine(FakeEngine(split=False))
    assert not uses_continuous_engine(FakeEngine(split=True))
    assert uses_continuous_engine(FakeEngine(split=True), "continuous")
    assert not uses_continuous_engine(FakeEngine(split=False), "static")
    with pytest.raises(ValueError, match="scheduler must be"):
        uses_continuous_engine(FakeEngine(split=False), "dynamic")
    static = create_scheduler(FakeEngine(split=True), max_batch_size=3, context_length=100)
    assert isinstance(static, BatchScheduler) and (static.max_batch_size, static.context_length) == (3, 100)
    with pytest.raises(ValueError, match="scheduler must be"):
        ServerSettings(model_id="tiny", scheduler="dynamic")
    for name in ("max_num_seqs", "max_images"):
        with pytest.raises(ValueError, match=f"{name} must be positive, got 0"):
            ServerSettings(model_id="tiny", **{name: 0})


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)


def test_cpu_engines_get_the_continuous_engine_with_its_settings(chat):
    prefill = PrefillSettings(chunk=64, layer_tokens=2)
    scheduler = create_scheduler(chat, max_batch_size=8, max_num_seqs=3, prefill=prefill)
    assert isinstance(scheduler, ContinuousScheduler)
    assert (scheduler.engine.slots.max_num_seqs, scheduler.engine.prefill.settings) == (3, prefill)
    assert isinstance(create_scheduler(chat, max_batch_size=8, scheduler="static"), BatchScheduler)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2)
    assert create_scheduler(engine, max_batch_size=8).engine is engine
    with pytest.raises(ValueError, match="needs a ChatEngine"):
        create_scheduler(engine, max_batch_size=8, scheduler="static")


class BrokenDevice(ContinuousEngine):
    def admit_request(self, handle, slot):
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_device_error_on_the_continuous_path_makes_the_server_unhealthy(chat):
    reasons = []
    app = create_app(BrokenDevice(chat.model, chat.processor, max_num_seqs=2), ServerSettings(model_id="tiny"),
                     on_fatal=reasons.append)
    assert isinstance(app.state.scheduler, ContinuousScheduler)
    with ServerThread(app) as running:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(running.base + URL, json=body, timeout=60).status_code == 500
        health = httpx.get(running.base + "/health", timeout=10)
        assert health.status_code == 503 and "CUDA error" in health.json()["reason"]
        assert len(reasons) == 1 and "device-side assert" in reasons[0]
        assert httpx.post(running.base + URL, json=body, timeout=60).status_code == 503


def test_the_server_exits_with_a_message_for_sms_set_aside_on_a_cpu(tmp_path_factory):
    with pytest.raises(SystemExit, match=r"error: SMs set aside for prefill \(sms=4\) are SMs of the model's GPU, "
                                         r"and it is on cpu"):
        main(["--model_path", str(tiny_checkpoint(tmp_path_factory)), "--device", "cpu", "--prefill-sms", "4"])


def test_the_server_without_its_extra_exits_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r'error: the server needs the serve extra: uvicorn is not installed: '
                                         r'pip install -e "\.\[serve\]"'):
        main(["--model_path", "no-such-model"])  # named before any model loads


def test_the_server_sets_sms_aside_for_prefill_by_default_and_off_turns_it_off(capsys):
    assert ServerSettings(model_id="tiny").prefill.sms == "auto"
    assert parse_args(["--model_path", "m"]).prefill_sms == "auto"
    assert parse_args(["--model_path", "m", "--prefill-sms", "off"]).prefill_sms is None
    assert parse_args(["--model_path", "m", "--prefill-sms", "96"]).prefill_sms == 96
    with pytest.raises(SystemExit):
        parse_args(["--model_path", "m", "--prefill-sms", "0"])
    assert "--prefill-sms takes auto, off or a number of SMs >= 1, not '0'" in capsys.readouterr().err


def test_a_cpu_server_with_sms_auto_prefills_between_the_steps(chat):
    scheduler = create_scheduler(chat, max_batch_size=8, max_num_seqs=2, prefill=PrefillSettings(sms="auto"))
    try:
        assert "prompts prefilled eagerly" in scheduler.engine.startup_summary
        assert isinstance(scheduler.engine.prefill, Prefill)  # between the steps, no prefill thread
    finally:
        scheduler.close()


def test_health_counts_of_an_engine_that_prefills_on_a_thread(chat):
    scheduler = create_scheduler(chat, max_batch_size=8, max_num_seqs=2, prefill=PrefillSettings(chunk=64, device="cpu"))
    try:
        stats = scheduler.stats
        assert (stats.prompt_graphs, stats.tower_graphs, stats.decode_graphs, stats.slots_in_use,
                stats.whole_prefills) == (0, 0, 0, 0, 0)
    finally:
        scheduler.close()
