"""Run a dataset: answer every row of a JSONL file into another, resumably, on one engine, one engine
per GPU of a machine, or a Ray Data stage (README: "Run a dataset").

    rows.py        the input rows, read and checked
    output.py      the output file: whole lines, resume, torn last line
    prepare.py     the image workers (read and tile, off the engine's thread)
    engine_spec.py what an engine is built from (crosses processes)
    runner.py      one engine over a stream of rows
    processes.py   one engine process per device, rows from one queue, one writer
    ray_stage.py   the engine as a Ray Data stage (BatchPredictor) and --ray
    driver.py      a run over files, whatever answers the rows (resume, progress)
    cli.py         python -m deepseek_vl2.batch

Decisions, and why:
- Greedy by default (inference.py samples at 0.4): a dataset's answers should not depend on the run,
  the route or a resume.
- A repeated id is answered once (its first row); later rows with it get a `{"line", "error"}`
  record, so each id names exactly one record and resume by id is unambiguous.
- Error records count as done on resume (a missing image stays missing); `--retry_errors` reruns
  them. A failure of the engine rather than of the row (the device's: out of memory, a CUDA error;
  a dead engine process or Ray actor) writes no record: those rows are missing, the exit status is
  1, and a rerun answers them. A run whose engine fails every row stops taking rows.
- `<image>` tags follow the engine's one rule (untagged images get tags in front), so a row answers
  as through inference.py or the server; more tags than images is the mismatch that fails a row.
- Image workers are threads (PIL and torch release the GIL, the processor is thread-safe, and the
  tiles stay in the engine's process); at most 2 x max_num_seqs rows are in flight per engine.
- Without a GPU: one CPU engine in process; `--workers N` runs N CPU engine processes (the
  multi-process path, testable on the CPU).
- `--ray`: the driver reads, checks and resumes the input and writes the one output file, the
  actors only answer rows, so the files behave as on the other routes.
"""
from .driver import RunSummary, run_dataset
from .engine_spec import EngineSpec
from .rows import Row, read_rows
from .runner import EngineRunner

__all__ = ["EngineRunner", "EngineSpec", "Row", "RunSummary", "read_rows", "run_dataset"]
