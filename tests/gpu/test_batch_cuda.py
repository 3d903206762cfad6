"""The batch runner on CUDA (skipped without it), tiny_mha fixture in bfloat16 (decode steps as CUDA
graphs): every row of the test dataset gets one record, its bad rows and lines error records; with
two GPUs, an engine on cuda:1 answers as one on cuda:0, and `--gpus 2` (one engine process per GPU)
gives the records of one in-process engine. Rows run one at a time (`max_num_seqs` 1) where records
are compared, so that both sides run every row alone, with the same kernels: equal to the bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batch_helpers import BAD_ROWS, CHECKPOINT, GOOD_ROWS, MAX_NEW, by_key, read_output, write_dataset
from deepseek_vl2.batch import EngineRunner, EngineSpec, run_dataset
from deepseek_vl2.batch.rows import run_settings

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

REPO = Path(__file__).resolve().parents[2]


def run_in_process(rows: Path, output: Path, device: str, slots: int) -> list:
    engine = EngineSpec(str(CHECKPOINT), dtype="bfloat16", max_num_seqs=slots).build(device)
    runner = EngineRunner(engine, run_settings(max_new_tokens=MAX_NEW))
    try:
        run_dataset(rows, output, runner.run, progress=False)
    finally:
        runner.close()
    return read_output(output)


def test_every_row_has_one_record_on_cuda(tmp_path):
    rows = write_dataset(tmp_path)
    records = by_key(run_in_process(rows, tmp_path / "out.jsonl", "cuda", slots=4))
    answers = {key[1] for key, record in records.items() if "text" in record}
    assert answers == {json.dumps(row["id"]) for row in GOOD_ROWS}
    assert {key[1] for key, record in records.items() if key[0] == "id" and "error" in record} == \
        {json.dumps(row_id) for row_id in BAD_ROWS}
    assert sum(key[0] == "line" for key in records) == 3
    limits = {json.dumps(row["id"]): row.get("max_new_tokens", MAX_NEW) for row in GOOD_ROWS}
    for (_, row_id), record in records.items():
        if "text" in record:  # each row within its own max_new_tokens (the run's, or the row's setting)
            assert 1 <= record["completion_tokens"] <= limits[row_id], (row_id, record)
            assert record["finish_reason"] in ("stop", "length"), (row_id, record)


@two_gpus
def test_an_engine_on_the_second_gpu_answers_as_on_the_first(tmp_path):
    rows = write_dataset(tmp_path)
    first = run_in_process(rows, tmp_path / "gpu0.jsonl", "cuda:0", slots=1)
    second = run_in_process(rows, tmp_path / "gpu1.jsonl", "cuda:1", slots=1)
    assert by_key(second) == by_key(first)


@two_gpus
def test_two_gpu_processes_give_the_records_of_one_engine(tmp_path):
    rows = write_dataset(tmp_path)
    alone = run_in_process(rows, tmp_path / "alone.jsonl", "cuda:0", slots=1)
    output = tmp_path / "two.jsonl"
    result = subprocess.run([sys.executable, "-m", "deepseek_vl2.batch", "--model_path", str(CHECKPOINT),
                             "--input", str(rows), "--output", str(output), "--max_new_tokens", str(MAX_NEW),
                             "--dtype", "bfloat16", "--gpus", "2", "--max_num_seqs", "1", "--no_progress"],
                            cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert by_key(read_output(output)) == by_key(alone)
    engines = [line for line in result.stderr.splitlines() if line.startswith("engine ")]
    assert len(engines) == 2 and engines[0].startswith("engine 0 (cuda:0): ") and \
        engines[1].startswith("engine 1 (cuda:1): ")
