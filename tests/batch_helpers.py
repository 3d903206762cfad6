"""Helpers of tests/batch: a small dataset for the batch runner's tests, good rows (images by relative and
absolute path, text only, per-row settings) and bad ones (invalid JSON, a duplicate id, a missing image, more <image>
tags than images, an unusable setting, a prompt too long for a slot), and readers of the output."""
import json
import shutil
from pathlib import Path

from goldens import CHECKPOINTS, FIXTURES

CHECKPOINT = CHECKPOINTS["tiny_mha"]
MAX_NEW = 24
IMAGES = FIXTURES / "images"

GOOD_ROWS = [
    {"id": "cap-1", "prompt": "Describe the image.", "images": ["pics/a.png"]},
    {"id": "cap-2", "prompt": "<image>\nWhat colour dominates?", "images": [str(IMAGES / "p06_420x300.png")]},
    {"id": 7, "prompt": "Hello, who are you?"},
    {"id": "two", "prompt": "<image> and <image>: compare them.", "images": ["pics/a.png", "pics/b.png"],
     "max_new_tokens": 9},
    {"id": "story", "prompt": "Tell a story about a cat.", "max_new_tokens": 30, "category": "ignored column"},
    {"id": "count", "prompt": "Count to ten.", "min_new_tokens": 5, "max_new_tokens": 5},
    {"id": "wide", "prompt": "Read the text.", "images": [str(IMAGES / "p03_300x1200.png")]},
    {"id": "sampled", "prompt": "Say something.", "temperature": 0.8, "seed": 5, "max_new_tokens": 12},
]
BAD_LINES = [
    '{"id": "broken", "prompt": ',  # not JSON
    json.dumps({"id": "cap-1", "prompt": "again"}),  # duplicate id
    json.dumps({"prompt": "no id"}),
]
BAD_ROWS = {
    "missing-image": {"prompt": "Describe.", "images": ["pics/nope.png"]},
    "unreadable-image": {"prompt": "Describe.", "images": ["pics/not_an_image.png"]},
    "too-many-tags": {"prompt": "<image><image> what?", "images": ["pics/a.png"]},
    "bad-setting": {"prompt": "Hi", "max_new_tokens": 0},
    "too-long": {"prompt": "word " * 5000},
}


def write_dataset(directory: Path) -> Path:
    """The dataset in `directory` (rows.jsonl, images under pics/); good and bad lines interleaved."""
    pics = directory / "pics"
    pics.mkdir(parents=True, exist_ok=True)
    shutil.copy(IMAGES / "p04_50x50.png", pics / "a.png")
    shutil.copy(IMAGES / "p08_600x400.jpg", pics / "b.png")
    (pics / "not_an_image.png").write_bytes(b"this is not a PNG file")
    lines = [json.dumps(row) for row in GOOD_ROWS]
    lines[2:2] = BAD_LINES[:2]
    lines += [json.dumps({"id": row_id, **row}) for row_id, row in BAD_ROWS.items()]
    lines.insert(5, "")  # a blank line is skipped
    lines.append(BAD_LINES[2])
    path = directory / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_output(path: Path) -> list:
    text = Path(path).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_key(records: list) -> dict:
    """Records by id (answers, error rows) or by line; asserts that none is there twice."""
    keyed = {}
    for record in records:
        key = ("id", json.dumps(record["id"])) if "id" in record else ("line", record["line"])
        assert key not in keyed, f"{key} twice in the output"
        keyed[key] = record
    return keyed
