"""The batch runner in process (one engine, tiny_mha, CPU): every row of the dataset has exactly one
record; answers are what `ChatEngine.chat` gives each row alone; bad rows and lines get error
records naming the problem; a rerun skips everything; the in-flight bound holds."""
import json

import pytest
import torch

from batch_helpers import BAD_ROWS, CHECKPOINT, GOOD_ROWS, MAX_NEW, by_key
from deepseek_vl2.batch import EngineRunner, EngineSpec, run_dataset
from deepseek_vl2.batch.driver import EngineFailed
from deepseek_vl2.batch.rows import Row, run_settings
from deepseek_vl2.batch.runner import answer_record
from deepseek_vl2.engine import ChatResult, GenerationParams, chat_conversation
from deepseek_vl2.grounding import GroundedBox
from deepseek_vl2.utils.io import load_pil_images


def input_lines(path) -> dict:
    """Line number -> text of the non-blank lines of the input."""
    return {number: text for number, text in enumerate(path.read_text().splitlines(), start=1) if text.strip()}


def test_every_row_has_one_record(reference):
    rows, records, summary = reference
    keyed = by_key(records)
    answered = {key for key, record in keyed.items() if "text" in record}
    assert answered == {("id", json.dumps(row["id"])) for row in GOOD_ROWS}
    failed = {key[1] for key, record in keyed.items() if key[0] == "id" and "error" in record}
    assert failed == {json.dumps(row_id) for row_id in BAD_ROWS}
    lines = input_lines(rows)
    bad_lines = {number for number, text in lines.items() if '"broken"' in text or '"again"' in text
                 or '"no id"' in text}
    assert {key[1] for key in keyed if key[0] == "line"} == bad_lines
    assert len(records) == len(lines)
    assert (summary.answered, summary.errors, summary.skipped) == (len(GOOD_ROWS), len(lines) - len(GOOD_ROWS), 0)
    assert summary.tokens == sum(record.get("completion_tokens", 0) for record in records)


def test_answers_equal_each_row_alone(reference, chat_engine):
    rows, records, _ = reference
    keyed = by_key(records)
    for row in GOOD_ROWS:
        paths = [str(rows.parent / path) for path in row.get("images", [])]
        conversation = chat_conversation([{"role": "user", "content": row["prompt"], "images": paths}])
        settings = {k: v for k, v in row.items() if k in ("max_new_tokens", "temperature", "seed", "min_new_tokens")}
        alone = chat_engine.chat(conversation, load_pil_images(conversation),
                                 run_settings(**{"max_new_tokens": MAX_NEW, **settings}))
        record = keyed[("id", json.dumps(row["id"]))]
        assert record == {"id": row["id"], "text": alone.text, "finish_reason": alone.finish_reason,
                          "prompt_tokens": alone.prompt_tokens, "completion_tokens": len(alone.token_ids)}, row
    assert keyed[("id", '"two"')]["completion_tokens"] == 9  # the row's own max_new_tokens
    assert keyed[("id", '"count"')]["completion_tokens"] == 5


def test_bad_rows_and_lines_name_their_problem(reference):
    rows, records, _ = reference
    keyed = by_key(records)
    errors = {key[1]: record["error"] for key, record in keyed.items() if "error" in record}
    assert set(keyed[("id", '"missing-image"')]) == {"id", "error"}
    assert f"no image file at '{rows.parent / 'pics/nope.png'}'" in errors['"missing-image"']
    assert "cannot read image" in errors['"unreadable-image"'] and "not_an_image.png" in errors['"unreadable-image"']
    assert "2 <image> tags but 1 images" in errors['"too-many-tags"']
    assert "max_new_tokens must be an int >= 1" in errors['"bad-setting"']
    assert "beyond the model's context of 4096" in errors['"too-long"']
    line_errors = [error for key, error in errors.items() if isinstance(key, int)]
    assert sum("not valid JSON" in error for error in line_errors) == 1
    assert sum("id 'cap-1' was already used on line 1" in error for error in line_errors) == 1
    assert sum("'id' must be a non-empty string or an integer" in error for error in line_errors) == 1


def test_a_rerun_skips_every_row(reference, tmp_path):
    rows, records, _ = reference
    output = tmp_path / "out.jsonl"
    output.write_text("".join(json.dumps(record) + "\n" for record in records))

    def execute(todo, emit):
        assert list(todo) == []

    summary = run_dataset(rows, output, execute, progress=False)
    assert (summary.answered, summary.errors, summary.skipped) == (0, 0, len(records))
    assert by_key([json.loads(line) for line in output.read_text().splitlines()]) == by_key(records)


def test_rows_in_flight_stay_within_the_bound(chat_engine):
    engine = EngineSpec("unused", max_num_seqs=2).engine_for(chat_engine.model, chat_engine.processor)
    runner = EngineRunner(engine, run_settings(max_new_tokens=6), in_flight=3, image_workers=2)
    taken, emitted, most = [0], [0], [0]

    def rows():
        for index in range(10):
            taken[0] += 1
            most[0] = max(most[0], taken[0] - emitted[0])
            yield Row(index, f"Question number {index}?", [])

    def emit(row, record):
        emitted[0] += 1
        assert record["completion_tokens"] == 6

    try:
        runner.run(rows(), emit)
    finally:
        runner.close()
    assert emitted[0] == 10 and most[0] == 3
    assert engine.stats.max_running == 2


def test_engine_errors_of_a_row_are_records_and_of_the_device_end_the_run(chat_engine):
    engine = EngineSpec("unused", max_num_seqs=2).engine_for(chat_engine.model, chat_engine.processor)
    runner = EngineRunner(engine, run_settings(max_new_tokens=3), in_flight=3, image_workers=1)
    submit, calls = engine.submit, [0]

    def failing_submit(sample, params, on_event):  # every other row: the row's error, then all: the device's
        calls[0] += 1
        if calls[0] > 6:
            on_event("error", RuntimeError("CUDA error: an illegal memory access was encountered"))
        elif calls[0] % 2 == 0:
            on_event("error", ValueError("generation step 0: the scores hold NaN or inf"))
        else:
            return submit(sample, params, on_event)

    engine.submit = failing_submit
    taken, records = [0], []

    def rows():
        for index in range(40):
            taken[0] += 1
            yield Row(index, f"Question {index}?", [])

    try:
        with pytest.raises(EngineFailed, match=r"row\(s\) failed in the engine and have no record .*; it stopped "
                                               r"taking rows; the first, 6: RuntimeError: CUDA error"):
            runner.run(rows(), lambda row, record: records.append(record))
    finally:
        runner.close()
    records.sort(key=lambda record: record["id"])  # one image worker: rows reach the engine in order
    assert [record["id"] for record in records] == list(range(6))
    assert [("error" in record) for record in records] == [False, True] * 3
    assert records[1]["error"] == "generation step 0: the scores hold NaN or inf"
    assert taken[0] <= 6 + 2 * 3  # stopped after in_flight failures in a row, not at the end of the rows


def test_answer_record_carries_grounding_boxes():
    result = ChatResult(text="<|ref|>cat<|/ref|><|det|>[[1, 2, 30, 40]]<|/det|>", token_ids=[5, 6, 7],
                        prompt_tokens=11, finish_reason="stop",
                        boxes=[GroundedBox("cat", (1, 2, 30, 40))])
    assert answer_record(Row("g", "", []), result) == {
        "id": "g", "text": result.text, "finish_reason": "stop", "prompt_tokens": 11, "completion_tokens": 3,
        "boxes": [{"label": "cat", "box": [1, 2, 30, 40]}]}


def test_a_quantized_spec_answers_as_the_quantized_chat():
    """--quantization reaches the engine through EngineSpec (every route builds its engine there):
    rows answered by an int8 engine equal ChatEngine.chat on the same checkpoint loaded in int8."""
    from deepseek_vl2.engine import ChatEngine
    from deepseek_vl2.quantization.weight import QuantizedWeight

    spec = EngineSpec(str(CHECKPOINT), dtype="float32", max_num_seqs=2, quantization="int8")
    engine = spec.build("cpu")
    assert any(isinstance(m, QuantizedWeight) for m in engine.model.modules())
    runner = EngineRunner(engine, run_settings(max_new_tokens=8), in_flight=2, image_workers=1)
    records = {}
    try:
        runner.run([Row(i, f"Question number {i}?", []) for i in range(2)], lambda row, r: records.update({row.id: r}))
    finally:
        runner.close()
    chat = ChatEngine.load(str(CHECKPOINT), device="cpu", dtype=torch.float32, quantization="int8")
    for i in range(2):
        conversation = chat_conversation([{"role": "user", "content": f"Question number {i}?"}])
        alone = chat.chat(conversation, [], GenerationParams(max_new_tokens=8, temperature=0))
        assert records[i]["text"] == alone.text and records[i]["completion_tokens"] == len(alone.token_ids)
