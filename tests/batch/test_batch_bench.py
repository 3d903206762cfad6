"""benchmarks/batch_bench.py's measuring code, on the CPU: the fixture checkpoint instead of random weights
at the release's shapes, a few small rows (the script's GPU runs are the lead's)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from batch_helpers import CHECKPOINT

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_gpu_mode_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "batch_bench.py"), "--model_path",
                             str(CHECKPOINT), "--device", "cpu", "--rows", "6", "--loop-rows", "2", "--slots", "4",
                             "--new-tokens", "4", "--image-size", "256", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["loop"]["rows"] == 2 and report["batch"]["rows"] == 6 and report["batch"]["errors"] == 0
    assert report["batch"]["max_running"] == 4 and report["same_text_as_loop"] == "2 of 2"
    assert report["ratio_tok_s"] == round(report["batch"]["tok_s"] / report["loop"]["tok_s"], 2)
    assert report["gpu"] == "cpu" and report["model"] == str(CHECKPOINT)
