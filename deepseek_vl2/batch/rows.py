"""Input rows of a batch run: one JSON object per line of a JSONL file, read and checked.

    {"id": "q1", "prompt": "<image>\\nWhat is written here?", "images": ["scans/1.png"], "max_new_tokens": 64}

- "id" (required): a string or an integer, unique in the file; it names the row's answer in the
  output and is how a rerun knows the row is done.
- "prompt" (required): the user's text; its `<image>` tags take the images in order. Images without
  a tag get one each in front of the text (the engine's one rule, `engine.messages.tagged_text`: the
  same row answers the same through inference.py, the server and this runner); more tags than
  images is an error.
- "images" (optional, default none): file paths, relative to the input file's directory or absolute.
- optional generation settings, each overriding the run's (`SETTINGS`): max_new_tokens,
  temperature, top_p, repetition_penalty, top_k, min_new_tokens, seed, stop. `null` means "the
  run's value".
- any other key is ignored: datasets carry their own columns (reference answers, categories) and
  join them to the output by id.

A line that is not a JSON object (or not UTF-8 text) is reported by line number (`BadLine`); a row with a
usable id but a problem (a missing prompt, images not a list of strings, an unusable setting) by id (`BadRow`).
Text with a lone surrogate (a JSON escape such as "\\ud800" that encodes no character) is not an id or a
prompt.
A later row with an id seen before is reported by line number, so that each id has exactly one
answer in the output.
"""
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, List, Union

from ..engine import GenerationParams
from ..utils.text import lone_surrogate

SETTINGS = tuple(f.name for f in fields(GenerationParams))
INT_SETTINGS = ("max_new_tokens", "top_k", "min_new_tokens", "seed")


def run_settings(**overrides) -> GenerationParams:
    """A run's generation settings: GenerationParams' defaults, but greedy (a dataset's answers then
    do not depend on the run, the route or a resume)."""
    return GenerationParams(**{"temperature": 0.0, **overrides})


@dataclass
class Row:
    """A checked input row: what a runner needs to answer it (plain data: it crosses processes)."""

    id: Union[str, int]
    prompt: str
    images: List[str]  # absolute paths
    settings: dict = field(default_factory=dict)  # GenerationParams fields this row sets
    line: int = 0  # 1-based line of the input file

    def params(self, defaults: GenerationParams) -> GenerationParams:
        """The run's settings with this row's on top (ValueError naming a bad one)."""
        merged = {name: getattr(defaults, name) for name in SETTINGS}
        merged.update(self.settings)
        return GenerationParams(**merged)


@dataclass
class BadLine:
    """A line that is not a row at all: its answer is `{"line", "error"}`."""

    line: int
    error: str

    def record(self) -> dict:
        return {"line": self.line, "error": self.error}


@dataclass
class BadRow:
    """A row with an id that cannot be answered: its answer is `{"id", "error"}`."""

    id: Union[str, int]
    error: str
    line: int = 0

    def record(self) -> dict:
        return {"id": self.id, "error": self.error}


def id_key(row_id) -> str:
    """How ids are compared (the string "7" and the integer 7 are different ids)."""
    return json.dumps(row_id)


def valid_id(value) -> bool:
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def parse_row(data, base_dir: Path, line: int = 0) -> Union[Row, BadRow, BadLine]:
    """A decoded JSON value -> a Row, or what is wrong with it."""
    where = f"line {line}: " if line else ""  # rows from columns (Ray) have no line
    if not isinstance(data, dict):
        return BadLine(line, f"{where}expected a JSON object, got {type(data).__name__}")
    row_id = data.get("id")
    if not valid_id(row_id):
        return BadLine(line, f"{where}'id' must be a non-empty string or an integer, got {row_id!r}")
    if isinstance(row_id, str) and (surrogate := lone_surrogate(row_id)):
        return BadLine(line, f"{where}'id' is not valid Unicode text: it holds the lone surrogate {surrogate}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        return BadRow(row_id, f"'prompt' must be a string, got {_kind(prompt)}", line)
    if surrogate := lone_surrogate(prompt):
        return BadRow(row_id, f"'prompt' is not valid Unicode text: it holds the lone surrogate {surrogate}", line)
    images = data.get("images")
    images = [] if images is None else images
    if not isinstance(images, list) or not all(isinstance(path, str) and path for path in images):
        return BadRow(row_id, "'images' must be a list of file paths (strings)", line)
    settings = {name: data[name] for name in SETTINGS if data.get(name) is not None}
    if isinstance(settings.get("stop"), list):
        settings["stop"] = tuple(settings["stop"])
    row = Row(row_id, prompt, [str(base_dir / path) for path in images], settings, line)
    try:
        row.params(GenerationParams())
    except (ValueError, TypeError) as error:
        return BadRow(row_id, f"bad generation setting: {error}".replace("GenerationParams.", ""), line)
    return row


def read_rows(path: Path) -> Iterator[Union[Row, BadRow, BadLine]]:
    """Every line of the JSONL file `path`, checked (blank lines are skipped); an id seen before
    makes a BadLine naming the line of its first row."""
    base_dir = path.resolve().parent
    first_line = {}
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_byte = raw[error.start]
                yield BadLine(number, f"line {number} is not valid UTF-8 (byte 0x{bad_byte:02x} at position "
                                      f"{error.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                yield BadLine(number, f"line {number}: not valid JSON ({error})")
                continue
            item = parse_row(data, base_dir, number)
            if not isinstance(item, BadLine):
                key = id_key(item.id)
                if key in first_line:
                    yield BadLine(number, f"line {number}: id {item.id!r} was already used on line "
                                          f"{first_line[key]}; each id is answered once")
                    continue
                first_line[key] = number
            yield item


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


def row_from_fields(values: dict, base_dir: Path, line: int = 0) -> Union[Row, BadRow, BadLine]:
    """A row given as columns (a Ray Data row): numpy values as Python ones, a missing value (None,
    or NaN in a numeric column with gaps) as absent, a whole float as an int where an int is due
    (Arrow stores an int column with gaps as floats)."""
    data = {}
    for key, value in values.items():
        value = value.tolist() if hasattr(value, "tolist") else value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key in INT_SETTINGS and isinstance(value, float) and value.is_integer():
            value = int(value)
        data[key] = value
    return parse_row(data, base_dir, line)
