"""`python -m deepseek_vl2.batch` as a user runs it (subprocesses, tiny_mha, CPU): killed with SIGKILL in
the middle and rerun, it completes the file with the same records as an uninterrupted run, with one
engine and with two CPU engine processes (which end with their killed parent); the Ray Data route on
a local Ray instance gives the same records, both `--ray` and the example's
`read_json(...).map_batches(BatchPredictor, ...)`. Every subprocess runs in its own process group
under a deadline, killed whole when it passes (nothing can hang the suite)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_helpers import BAD_ROWS, CHECKPOINT, GOOD_ROWS, MAX_NEW, by_key, read_output
from deepseek_vl2.batch.cli import main

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 300


def command(rows: Path, output: Path, *extra) -> list:
    return [sys.executable, "-m", "deepseek_vl2.batch", "--model_path", str(CHECKPOINT), "--input", str(rows),
            "--output", str(output), "--max_new_tokens", str(MAX_NEW), "--device", "cpu", "--no_progress", *extra]


def run(args: list, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
    """`args` in a process group of its own, all of it killed if it runs past `timeout`."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{args[1:4]} ran past {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def answered(path: Path) -> int:
    return path.read_text().count('"text": ') if path.exists() else 0


def kill_after_answers(args: list, output: Path, answers: int = 2) -> list:
    """Start `args`, SIGKILL its main process once `output` holds `answers` answers; the child
    processes it had (engine processes) must end by themselves. Returns their pids."""
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while answered(output) < answers:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no answers before the deadline"
            time.sleep(0.02)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        process.kill()
        process.wait(30)
        deadline = time.monotonic() + 30
        while alive := [pid for pid in children if running(pid)]:
            assert time.monotonic() < deadline, f"processes {alive} outlived the killed run"
            time.sleep(0.1)
        return children
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (nothing, if all went well)
        except ProcessLookupError:
            pass
        process.stderr.close()


def running(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killed_and_rerun_gives_the_complete_file(reference, tmp_path):
    rows, expected, _ = reference
    output = tmp_path / "out.jsonl"
    kill_after_answers(command(rows, output, "--max_num_seqs", "1"), output)  # one row at a time
    killed = read_output(output)
    assert 2 <= answered(output) < len(GOOD_ROWS), "the kill did not land in the middle"
    torn = b'{"id": "story", "text": "Once up'
    with open(output, "ab") as file:  # and a write the kill tore
        file.write(torn)
    result = run(command(rows, output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(killed)} already in the output" in result.stderr
    assert f"cut a partial last line ({len(torn)} bytes)" in result.stderr
    records = read_output(output)
    assert records[:len(killed)] == killed
    assert by_key(records) == by_key(expected)


@pytest.mark.slow
def test_two_cpu_engine_processes_killed_and_rerun_give_the_same_records(reference, tmp_path):
    rows, expected, _ = reference
    output = tmp_path / "out.jsonl"
    children = kill_after_answers(command(rows, output, "--workers", "2", "--max_num_seqs", "1"), output)
    assert len(children) >= 2  # the engine processes (and multiprocessing's resource tracker)
    killed = read_output(output)
    assert 2 <= answered(output) < len(GOOD_ROWS), "the kill did not land in the middle"
    result = run(command(rows, output, "--workers", "2", "--max_num_seqs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_output(output)
    assert records[:len(killed)] == killed and by_key(records) == by_key(expected)
    reports = [line for line in result.stderr.splitlines() if line.startswith("engine ")]
    assert sorted(line.split(":")[0] for line in reports) == ["engine 0 (cpu)", "engine 1 (cpu)"]
    engine_rows = len(GOOD_ROWS) + len(BAD_ROWS) - 1  # "bad-setting" fails in the reader, before any engine
    done = sum(record.get("id") not in (None, "bad-setting") for record in killed)
    assert sum(int(line.split(": ")[1].split(" rows")[0]) for line in reports) == engine_rows - done


@pytest.mark.slow
def test_the_ray_route_gives_the_same_records(reference, tmp_path):
    pytest.importorskip("ray.data")
    rows, expected, _ = reference
    output, example_output = tmp_path / "out.jsonl", tmp_path / "example"
    good = tmp_path / "good.jsonl"  # read_json needs valid lines and one type per column: ids as strings
    good.write_text("".join(json.dumps(dict(row, id=str(row["id"]))) + "\n" for row in GOOD_ROWS))
    (tmp_path / "pics").symlink_to(rows.parent / "pics")
    result = run([sys.executable, str(Path(__file__).with_name("ray_session.py")), str(CHECKPOINT), str(rows),
                  str(output), str(good), str(example_output), str(MAX_NEW)])
    assert result.returncode == 0, result.stderr[-5000:]
    assert by_key(read_output(output)) == by_key(expected)
    example = [json.loads(line) for path in sorted(example_output.glob("*.json")) for line in path.open()]
    reference_answers = {str(r["id"]): r for r in expected if "text" in r}
    assert sorted(row["id"] for row in example) == sorted(reference_answers)
    for row in example:
        want = reference_answers[row["id"]]
        assert row["error"] is None and row["boxes"] == []
        assert [row[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")] == \
               [want[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "--gpus needs CUDA GPUs; the device is cpu"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--chunk_size", "0"], "--chunk_size must be -1"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--image_workers", "0"], "--image_workers must be >= 1, got 0"),
    (["--ray", "--workers", "2"], "with --ray use --ray_actors"),
])
def test_unusable_arguments_are_named(tmp_path, capsys, args, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "prompt": "hi"}\n')
    status = main(["--model_path", str(CHECKPOINT), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                   "--device", "cpu", *args])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_without_its_extra_is_named(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "prompt": "hi"}\n')
    status = main(["--model_path", str(CHECKPOINT), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                   "--device", "cpu", "--ray"])
    assert status == 2
    assert 'error: --ray needs the ray extra: ray is not installed: pip install -e ".[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_missing_input_is_named(tmp_path, capsys):
    status = main(["--model_path", str(CHECKPOINT), "--input", str(tmp_path / "none.jsonl"), "--output",
                   str(tmp_path / "out.jsonl"), "--device", "cpu"])
    assert status == 2 and "--input: no file at" in capsys.readouterr().err


@pytest.mark.parametrize("output, message", [
    ("odir", "--output {tmp}/odir: is a directory; name a file"),
    ("img.png/o.jsonl", "--output {tmp}/img.png/o.jsonl: {tmp}/img.png is a file, not a directory"),
    ("img.png/sub/o.jsonl", "--output {tmp}/img.png/sub/o.jsonl: {tmp}/img.png is a file, not a directory"),
])
def test_an_output_that_cannot_be_a_file_is_named(tmp_path, capsys, output, message):
    (tmp_path / "odir").mkdir()
    (tmp_path / "img.png").write_bytes(b"an image")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "prompt": "hi"}\n')
    status = main(["--model_path", str(CHECKPOINT), "--input", str(rows), "--output", str(tmp_path / output),
                   "--device", "cpu"])
    assert status == 2
    assert capsys.readouterr().err.replace("'", "").startswith(f"error: {message.format(tmp=tmp_path)}")


def test_max_num_seqs_beyond_the_memory_is_named(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "prompt": "hi"}\n')
    status = main(["--model_path", str(CHECKPOINT), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                   "--device", "cpu", "--no_progress", "--max_num_seqs", "1000000000"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "error: --max_num_seqs 1000000000: the engine ran out of memory on cpu" in err
    assert "its KV cache alone is 1000000000 rows x 4096 tokens = 5,859,375.0 GiB" in err
    assert err.rstrip().endswith("lower --max_num_seqs")


@pytest.mark.slow
def test_engine_processes_that_cannot_start_end_the_run(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "prompt": "hi"}\nnot json\n')
    status = main(["--model_path", str(tmp_path / "missing"), "--input", str(rows), "--output",
                   str(tmp_path / "out.jsonl"), "--device", "cpu", "--workers", "2", "--no_progress"])
    err = capsys.readouterr().err
    assert status == 1 and "the engine processes ended before the rows did" in err
    assert err.count("CheckpointError: checkpoint directory") == 2
    assert read_output(tmp_path / "out.jsonl") == [{"line": 2, "error": "line 2: not valid JSON (Expecting value: "
                                                                        "line 1 column 1 (char 0))"}]
