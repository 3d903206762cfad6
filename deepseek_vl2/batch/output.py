"""The output file of a batch run: one JSON object per line, written whole, resumable.

Each record is written as one line with a single `os.write` on a file opened for appending, so a
process killed at any moment leaves whole lines, except possibly a last line the kernel had not
finished: on resume a trailing line without its newline (torn) is cut off, once every whole line
has been read as a record and the tail could be one; a line that is not a record is an error (the
file is not one of ours; nothing in it is changed). One run at a time: the file is locked while a
run has it open, and a second run on it is refused.

Resume: the ids (and, for lines that were not rows, the line numbers) already in the file are done;
the runner skips them. `retry_errors` first drops the `{"id", "error"}` records, so those rows run
again (for instance after fixing a missing image); the file is rewritten through a temporary file
and an atomic rename.
"""
import json
import os
from pathlib import Path
from typing import Set

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked against each other
    fcntl = None

from .rows import id_key


class OutputFileError(ValueError):
    """The output file exists but is not a batch output."""


class OutputFile:
    def __init__(self, path: Path, retry_errors: bool = False):
        """Open `path` for appending, after reading what is done in it (created when missing)."""
        self.path = Path(path)
        self.done_ids: Set[str] = set()  # id_key of rows answered (or failed) already
        self.done_lines: Set[int] = set()  # input lines reported as not rows already
        self.torn_bytes = 0  # the size of the partial last line cut off on opening
        self.dropped_errors = 0  # error records removed by retry_errors
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open_locked()
        try:
            rewritten = self._resume(retry_errors)
        except BaseException:
            os.close(self._fd)
            raise
        if rewritten:  # through a new file: lock that one
            os.close(self._fd)
            self._fd = self._open_locked()

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputFileError(f"--output {self.path} is in use by another run (one run at a time may write "
                                  "a file)") from None
        return fd

    def _resume(self, retry_errors: bool) -> bool:
        """Read what is done; whether the file was rewritten (retry_errors dropped records)."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        kept, records = [], 0
        for number, line in enumerate(data[:end].splitlines(keepends=True), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not ("id" in record or "line" in record):
                raise OutputFileError(f"{self.path}, line {number}: not a record of a batch run; refusing to "
                                      "append to it (choose another --output)")
            records += 1
            if retry_errors and "id" in record and "error" in record:
                self.dropped_errors += 1
                continue
            kept.append(line)
            if "id" in record:
                self.done_ids.add(id_key(record["id"]))
            else:
                self.done_lines.add(record["line"])
        tail = data[end:]
        if tail:  # a killed run's last, partial write, if it could be one
            if not records and not _could_start_a_record(tail):
                raise OutputFileError(f"{self.path}: not a record of a batch run; refusing to append to it "
                                      "(choose another --output)")
            self.torn_bytes = len(tail)
            os.truncate(self.path, end)
        if not self.dropped_errors:
            return False
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(b"".join(kept))
        os.replace(temporary, self.path)
        return True

    def is_done(self, item) -> bool:
        """Whether a Row / BadRow (by id) or a BadLine (by line) has its record in the file."""
        if hasattr(item, "id"):
            return id_key(item.id) in self.done_ids
        return item.line in self.done_lines

    def write(self, record: dict) -> None:
        """Append `record` as one whole line."""
        # a lone surrogate (in an error text quoting a bad value) becomes its JSON escape: the file stays UTF-8
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", errors="backslashreplace")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk, say: never leave a line torn silently
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a record")
        if "id" in record:
            self.done_ids.add(id_key(record["id"]))
        else:
            self.done_lines.add(record["line"])

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _could_start_a_record(tail: bytes) -> bool:
    """Whether `tail` begins as this runner writes a record (the id or the line number first)."""
    return any(tail.startswith(start) or start.startswith(tail) for start in (b'{"id": ', b'{"line": '))
