"""Run a dataset: answer every row of a JSONL file into another, resumably, on one engine, one engine
per GPU of a machine, or a Ray Data stage.

    rows.py        the input rows, read and checked
    output.py      the output file: whole lines, resume, torn last line
    prepare.py     the image workers (read and tile, off the engine's thread)
    engine_spec.py what an engine is built from (crosses processes)
    runner.py      one engine over a stream of rows
    processes.py   one engine process per device, rows from one queue, one writer
    ray_stage.py   the engine as a Ray Data stage (BatchPredictor) and --ray
    driver.py      a run over files, whatever answers the rows (resume, progress)
    cli.py         python -m deepseek_vl2.batch
"""
from .driver import RunSummary, run_dataset
from .engine_spec import EngineSpec
from .rows import Row, read_rows
from .runner import EngineRunner

__all__ = ["EngineRunner", "EngineSpec", "Row", "RunSummary", "read_rows", "run_dataset"]
