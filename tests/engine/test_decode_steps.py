"""decode_steps.py on the CPU: the row counts and cache lengths a step is padded to, and the order in
which `capture_all` hands the (rows, cache length) keys to the capture (largest first: the graphs share
one memory pool, and a capture reuses blocks an earlier one freed only where they are large enough).
The graphs themselves: tests/gpu/test_continuous_graphs.py."""
import pytest

from deepseek_vl2.engine import decode_steps
from deepseek_vl2.engine.decode_steps import DecodeSteps, row_sizes
from deepseek_vl2.engine.slots import SlotCache
from goldens import fixture_model


def test_rows_are_padded_to_the_next_graph_size():
    assert row_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert row_sizes(12) == (1, 2, 4, 8, 12)
    lm = fixture_model("tiny_mha").language
    steps = DecodeSteps(lm, SlotCache(lm, 12, 600), use_graphs=False)
    assert steps.row_sizes == tuple(range(1, 13))  # eager steps run every row count as it is
    assert steps.kv_sizes == (256, 512, 600)


def test_the_largest_step_is_captured_first(monkeypatch):
    lm = fixture_model("tiny_mha").language
    steps = DecodeSteps(lm, SlotCache(lm, 12, 600), use_graphs=False)
    steps.row_sizes = row_sizes(12)  # what a graph engine pads to
    captured = []
    monkeypatch.setattr(decode_steps, "capture_each", lambda keys, *args: captured.extend(keys) or {})
    assert "captured 0 decode graphs (rows 1, 2, 4, 8, 12 x 3 cache lengths up to 600)" in steps.capture_all()
    assert captured[:4] == [(12, 600), (12, 512), (12, 256), (8, 600)] and captured[-1] == (1, 256)
    assert captured == sorted(captured, reverse=True) and len(captured) == 5 * 3


def test_graphs_are_captured_before_any_request():
    lm = fixture_model("tiny_mha").language
    slots = SlotCache(lm, 2, 600)
    steps = DecodeSteps(lm, slots, use_graphs=False)
    slots.allocate()
    with pytest.raises(RuntimeError, match="captured before any request is admitted"):
        steps.capture([(1, 256)])
