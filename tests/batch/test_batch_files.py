"""The batch runner's files, without a model: input rows checked (rows.py), the output file's resume
(done ids and lines, a torn last line cut off, --retry_errors, a foreign file refused)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from deepseek_vl2.batch.output import OutputFile, OutputFileError
from deepseek_vl2.batch.rows import BadLine, BadRow, Row, parse_row, read_rows, row_from_fields, run_settings

BASE = Path("/data/set")


def test_a_good_row_resolves_images_and_keeps_its_settings():
    row = parse_row({"id": "a", "prompt": "<image> hi", "images": ["x.png", "/abs/y.jpg"], "top_p": 0.5,
                     "stop": ["\n"], "label": "not a setting"}, BASE, 3)
    assert row == Row("a", "<image> hi", ["/data/set/x.png", "/abs/y.jpg"], {"top_p": 0.5, "stop": ("\n",)}, 3)
    params = row.params(run_settings(max_new_tokens=7))
    assert (params.top_p, params.max_new_tokens, params.temperature, tuple(params.stop)) == (0.5, 7, 0.0, ("\n",))
    assert parse_row({"id": 0, "prompt": "", "images": None, "seed": None}, BASE) == Row(0, "", [], {}, 0)


@pytest.mark.parametrize("data, error", [
    ([1, 2], "line 4: expected a JSON object, got list"),
    ({"prompt": "x"}, "line 4: 'id' must be a non-empty string or an integer, got None"),
    ({"id": "", "prompt": "x"}, "got ''"),
    ({"id": True, "prompt": "x"}, "got True"),
    ({"id": 1.5, "prompt": "x"}, "got 1.5"),
])
def test_lines_that_are_not_rows(data, error):
    item = parse_row(data, BASE, 4)
    assert isinstance(item, BadLine) and item.line == 4 and error in item.error
    assert item.record() == {"line": 4, "error": item.error}


@pytest.mark.parametrize("data, error", [
    ({"images": []}, "'prompt' must be a string, got nothing"),
    ({"prompt": 5}, "'prompt' must be a string, got int"),
    ({"prompt": "x", "images": "a.png"}, "'images' must be a list of file paths"),
    ({"prompt": "x", "images": [""]}, "'images' must be a list of file paths"),
    ({"prompt": "x", "temperature": "warm"}, "bad generation setting: temperature must be a finite number, got 'warm'"),
    ({"prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens must be an int >= 1, got 2.5"),
    ({"prompt": "x", "stop": "END"}, "stop must be a list of strings"),
])
def test_rows_that_cannot_be_answered(data, error):
    item = parse_row({"id": "r", **data}, BASE, 2)
    assert isinstance(item, BadRow), item
    assert error in item.error and item.record() == {"id": "r", "error": item.error}


def test_read_rows_reports_bad_json_and_duplicates_by_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\n{"id": "1", "prompt": "c"}\n{oops\n'
                    '{"id": 2, "prompt": "d"}')  # no newline at the end: still a row
    items = list(read_rows(path))
    assert [type(item).__name__ for item in items] == ["Row", "BadLine", "Row", "BadLine", "Row"]
    assert items[1].line == 3 and "id 1 was already used on line 1" in items[1].error
    assert items[2].id == "1"  # the string "1" is another id than the integer 1
    assert items[3].line == 5 and "not valid JSON" in items[3].error
    assert items[4].images == [] and items[4].line == 6


def test_a_line_that_is_not_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": 1, "prompt": "h\xff\xfei"}\r\n{"id": 2, "prompt": "caf\xc3\xa9"}\n')
    items = list(read_rows(path))
    assert items[0] == BadLine(1, "line 1 is not valid UTF-8 (byte 0xff at position 23)")
    assert items[1] == Row(2, "caf\u00e9", [], {}, 2)


def test_lone_surrogates_are_not_text(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "\\ud800", "prompt": "x"}\n{"id": 2, "prompt": "h\\udcffi"}\n')
    items = list(read_rows(path))
    assert items[0] == BadLine(1, "line 1: 'id' is not valid Unicode text: it holds the lone surrogate \\ud800")
    assert items[1] == BadRow(2, "'prompt' is not valid Unicode text: it holds the lone surrogate \\udcff", 2)


def test_rows_from_ray_columns():
    """numpy values, NaN for a missing float, whole floats where ints are due (an Arrow int column with gaps)."""
    row = row_from_fields({"id": np.int64(3), "prompt": np.str_("p"), "images": np.array(["a.png"], dtype=object),
                           "temperature": np.float64(math.nan), "max_new_tokens": np.float64(12.0),
                           "top_p": np.float64(0.25), "stop": None}, BASE)
    assert row == Row(3, "p", ["/data/set/a.png"], {"max_new_tokens": 12, "top_p": 0.25})
    assert isinstance(row.id, int) and isinstance(row.settings["max_new_tokens"], int)
    assert isinstance(row_from_fields({"id": 1, "prompt": "p", "max_new_tokens": 1.5}, BASE), BadRow)


def lines(*records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def test_resume_reads_done_ids_and_lines_and_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(lines({"id": "a", "text": "x"}, {"id": 2, "error": "bad"}, {"line": 5, "error": "json"})
                     + b'{"id": "b", "te')
    with OutputFile(path) as output:
        assert output.torn_bytes == len(b'{"id": "b", "te')
        assert output.is_done(Row("a", "", [])) and output.is_done(BadRow(2, "")) and output.is_done(BadLine(5, ""))
        assert not output.is_done(Row("b", "", [])) and not output.is_done(Row("2", "", []))
        output.write({"id": "b", "text": "y"})
        assert output.is_done(Row("b", "", []))
    assert path.read_bytes() == lines({"id": "a", "text": "x"}, {"id": 2, "error": "bad"},
                                      {"line": 5, "error": "json"}, {"id": "b", "text": "y"})


def test_retry_errors_drops_error_records_only(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(lines({"id": "a", "text": "x"}, {"id": "b", "error": "no image"}, {"line": 3, "error": "json"}))
    with OutputFile(path, retry_errors=True) as output:
        assert output.dropped_errors == 1 and not output.is_done(Row("b", "", []))
        assert output.is_done(Row("a", "", [])) and output.is_done(BadLine(3, ""))
    assert path.read_bytes() == lines({"id": "a", "text": "x"}, {"line": 3, "error": "json"})


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "line 1: not a record of a batch run"),
    (b'["a"]\n', "line 1: not a record of a batch run"),
    (b'{"name": 1}\n', "line 1: not a record of a batch run"),
    # no final newline: the last line is not cut as if a run had torn it
    (b"my notes\nimportant last line", "line 1: not a record of a batch run"),
    (b'{"setting": 1, "other": 2}', "notes.txt: not a record of a batch run"),
], ids=["text", "json-list", "json-object", "text-without-a-final-newline", "json-object-without-a-newline"])
def test_a_file_that_is_not_a_batch_output_is_refused_unchanged(tmp_path, content, message):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(OutputFileError, match=message):
        OutputFile(path)
    assert path.read_bytes() == content


def test_a_first_record_torn_by_a_killed_run_is_cut(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 7, "te')
    with OutputFile(path) as output:
        assert output.torn_bytes == len(b'{"id": 7, "te') and not output.is_done(Row(7, "", []))
    assert path.read_bytes() == b""


@pytest.mark.parametrize("retry_errors", [False, True])
def test_a_second_run_on_the_same_output_is_refused(tmp_path, retry_errors):
    """Two runs appending to one file would each write every row: the second is refused while the
    first has the file open (also after the first rewrote it for retry_errors)."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(lines({"id": "a", "text": "x"}, {"id": "b", "error": "no image"}))
    with OutputFile(path, retry_errors=retry_errors):
        with pytest.raises(OutputFileError, match=r"--output .*out\.jsonl is in use by another run"):
            OutputFile(path)
    with OutputFile(path) as output:  # free again once the first run has closed it
        assert output.is_done(Row("a", "", []))


def test_records_with_lone_surrogates_stay_utf8_json(tmp_path):
    path = tmp_path / "out.jsonl"
    with OutputFile(path) as output:
        output.write({"id": 1, "error": "no image file at 'a\\udcff\\ud800.png'", "text": "a\udcff\ud800"})
    path.read_bytes().decode("utf-8")
    assert json.loads(path.read_bytes())["text"] == "a\udcff\ud800"
