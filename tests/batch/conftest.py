"""Fixtures of tests/batch: the tiny_mha ChatEngine (CPU, float32) and the reference output of a run over
the dataset of batch_helpers.py through one in-process engine (greedy)."""
import pytest
import torch

from batch_helpers import CHECKPOINT, MAX_NEW, read_output, write_dataset


@pytest.fixture(scope="session")
def chat_engine():
    from deepseek_vl2.engine import ChatEngine

    return ChatEngine.load(str(CHECKPOINT), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, chat_engine):
    """(input path, records) of one in-process engine run over the dataset."""
    from deepseek_vl2.batch import EngineRunner, EngineSpec, run_dataset
    from deepseek_vl2.batch.rows import run_settings

    directory = tmp_path_factory.mktemp("reference")
    rows = write_dataset(directory)
    engine = EngineSpec(str(CHECKPOINT), max_num_seqs=3).engine_for(chat_engine.model, chat_engine.processor)
    runner = EngineRunner(engine, run_settings(max_new_tokens=MAX_NEW), in_flight=4, image_workers=2)
    try:
        summary = run_dataset(rows, directory / "out.jsonl", runner.run, progress=False)
    finally:
        runner.close()
    return rows, read_output(directory / "out.jsonl"), summary
