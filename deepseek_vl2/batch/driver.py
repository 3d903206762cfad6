"""A batch run over files, whatever answers the rows: read the input, skip what the output already
holds, write the records of bad lines and rows at once, stream the good rows to an executor (one
engine, engine processes, a Ray Data stage) and write its records as they come, with a progress bar.

An executor is `execute(rows, emit)`: it answers every Row of the iterable `rows` and calls
`emit(row, record)` for each, from the thread that called it; EngineFailed when its engines could not
answer them all (the rows without a record are answered by a rerun).
"""
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .output import OutputFile
from .progress import Progress
from .rows import BadLine, BadRow, Row, read_rows


class EngineFailed(RuntimeError):
    """An engine (process, Ray actor) failed: the rows it held have no record."""


Executor = Callable[[Iterable[Row], Callable[[Row, dict], None]], None]


@dataclass
class RunSummary:
    answered: int = 0
    errors: int = 0  # rows answered with {"id", "error"} or {"line", "error"} in this run
    skipped: int = 0  # already in the output
    tokens: int = 0
    seconds: float = 0.0
    torn_bytes: int = 0  # a partial last line of the output, cut off before resuming
    retried: int = 0  # error records dropped by retry_errors

    def line(self) -> str:
        text = (f"{self.answered} rows answered, {self.errors} error records, {self.skipped} already in the output; "
                f"{self.tokens} tokens in {self.seconds:.1f} s")
        if self.torn_bytes:
            text += f"; cut a partial last line ({self.torn_bytes} bytes) of the output before resuming"
        if self.retried:
            text += f"; retried {self.retried} rows that had errors"
        return text


def count_todo(input_path: Path, output: OutputFile) -> int:
    return sum(not output.is_done(item) for item in read_rows(input_path))


def run_dataset(input_path: Path, output_path: Path, execute: Executor, retry_errors: bool = False,
                progress: bool = True) -> RunSummary:
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input: no file at {str(input_path)!r}")
    if input_path.resolve() == output_path.resolve():
        raise ValueError("--output must not be the --input file")
    check_output_path(output_path)
    summary = RunSummary()
    started = time.perf_counter()
    with open_output(output_path, retry_errors) as output:
        summary.torn_bytes, summary.retried = output.torn_bytes, output.dropped_errors
        bar = Progress(count_todo(input_path, output), enabled=progress)
        lock = threading.Lock()  # records come from the caller's thread and the executor's feeder

        def record(item_record: dict) -> None:
            with lock:
                output.write(item_record)
                failed = "error" in item_record
                summary.errors += failed
                summary.answered += not failed
                summary.tokens += item_record.get("completion_tokens", 0)
                bar.advance(item_record.get("completion_tokens", 0))

        def rows() -> Iterator[Row]:
            for item in read_rows(input_path):
                if output.is_done(item):
                    summary.skipped += 1
                elif isinstance(item, (BadLine, BadRow)):
                    record(item.record())
                else:
                    yield item

        try:
            execute(rows(), lambda row, item_record: record(item_record))
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - started
    return summary


def check_output_path(output_path: Path) -> None:
    """ValueError naming --output when it cannot be a file: a directory, or under a file."""
    if output_path.is_dir():
        raise ValueError(f"--output {str(output_path)!r}: is a directory; name a file (for example "
                         f"{str(output_path / 'answers.jsonl')!r})")
    nearest = next((parent for parent in output_path.parents if parent.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise ValueError(f"--output {str(output_path)!r}: {str(nearest)!r} is a file, not a directory")


def open_output(output_path: Path, retry_errors: bool) -> OutputFile:
    """The OutputFile at `output_path`; an OSError (no permission, say) names --output."""
    try:
        return OutputFile(output_path, retry_errors)
    except OSError as error:
        raise OSError(f"--output {str(output_path)!r}: {error.strerror or error}") from error


def report(summary: RunSummary, output_path: Path) -> None:
    print(f"{output_path}: {summary.line()}", file=sys.stderr, flush=True)
