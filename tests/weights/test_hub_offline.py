"""Hub ids without a network: a quick, clear error naming the id and what to do instead, and loading
from the local hub cache when it holds the checkpoint. No network is needed: the hub endpoint is
pointed at a closed local port, in a subprocess (huggingface_hub reads its settings at import)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from goldens import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[2]
MISSING = "deepseek-ai/deepseek-vl2-tiny"
CACHED = "fixture-org/tiny-mha"

# Loads each hub id with the processor and the model, the first also with the README's command
# (inference.py); prints the outcomes and their times as JSON.
SCRIPT = r"""
import contextlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
import inference
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.weights.hub import CheckpointError

results = {}
for repo_id in sys.argv[2:]:
    for name, load in (("processor", DeepseekVLV2Processor.from_pretrained),
                       ("model", DeepseekVLV2ForCausalLM.from_pretrained)):
        start = time.perf_counter()
        try:
            out = type(load(repo_id)).__name__
        except CheckpointError as err:
            out = "CheckpointError: " + str(err)
        results[f"{name} {repo_id}"] = [out, time.perf_counter() - start]
stderr = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stderr(stderr):
    rc = inference.main(["--model_path", sys.argv[2]])
results[f"inference {sys.argv[2]}"] = [rc, stderr.getvalue(), time.perf_counter() - start]
print("RESULTS", json.dumps(results))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_cache_with(hf_home: Path, repo_id: str, checkpoint: Path) -> None:
    """The layout huggingface_hub keeps a downloaded repo in: snapshots/<commit> and refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run(tmp_path, offline: bool, *repo_ids) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", PYTHONPATH=str(ROOT))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), *repo_ids], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULTS "):])


def assert_clear_error(outcome, seconds, *says):
    assert outcome.startswith("CheckpointError: "), outcome
    assert seconds < 10, f"took {seconds:.1f} s"
    for phrase in (repr(MISSING), "pass a local checkpoint directory",
                   "python -m deepseek_vl2.offline_checkpoint --out DIR") + says:
        assert phrase in outcome, f"{phrase!r} not in: {outcome}"


def test_unreachable_hub_fails_fast_with_a_clear_message_and_cached_ids_still_load(tmp_path):
    hub_cache_with(tmp_path / "hf", CACHED, CHECKPOINTS["tiny_mha"])
    results = run(tmp_path, False, MISSING, CACHED)
    for name in ("processor", "model"):
        assert_clear_error(*results[f"{name} {MISSING}"], "the Hugging Face hub (http://127.0.0.1:",
                           "cannot be reached")
    rc, stderr, seconds = results[f"inference {MISSING}"]
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr  # one line, no traceback
    assert_clear_error("CheckpointError: " + lines[0][len("error: "):], seconds, "cannot be reached")
    assert results[f"processor {CACHED}"][0] == "DeepseekVLV2Processor"
    assert results[f"model {CACHED}"][0] == "DeepseekVLV2ForCausalLM"


def test_offline_mode_uses_the_local_cache_only(tmp_path):
    hub_cache_with(tmp_path / "hf", CACHED, CHECKPOINTS["tiny_mha"])
    results = run(tmp_path, True, MISSING, CACHED)
    for name in ("processor", "model"):
        assert_clear_error(*results[f"{name} {MISSING}"], "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    assert results[f"processor {CACHED}"][0] == "DeepseekVLV2Processor"
    assert results[f"model {CACHED}"][0] == "DeepseekVLV2ForCausalLM"


def test_hub_probe_tells_silence_from_an_answer():
    """The reachability check: any HTTP answer counts; a refused connection or a server that does not
    answer within the timeout does not (a network that drops packets looks like the latter)."""
    import http.server
    import threading
    import time

    from deepseek_vl2.weights.hub import _hub_answers

    assert not _hub_answers(f"http://127.0.0.1:{closed_port()}", 2.0)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.perf_counter()
        assert not _hub_answers(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert time.perf_counter() - start < 2
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _hub_answers(f"http://127.0.0.1:{server.server_port}", 5.0)
    finally:
        server.shutdown()
        server.server_close()
