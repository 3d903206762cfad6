"""The continuous-batching engine on the fixture checkpoints (CPU, float32): requests submitted at
different steps, with different prompts, images, settings and lengths, give exactly what
`ChatEngine.chat` gives for each alone (greedy and seeded), prefilled whole or in pieces between
the other rows' decode steps; cancellations free every slot; the
loop thread streams events; a short request is not held up by a long one."""
import functools
import threading

import pytest
import torch
from PIL import Image

from deepseek_vl2.engine import ChatEngine, GenerationParams, PrefillSettings, continuous
from deepseek_vl2.engine.continuous import WHOLE_PREFILL_QUEUE, ContinuousEngine
from deepseek_vl2.engine.prefill import Prefill, parse_prefill_sms
from deepseek_vl2.engine.prefill_thread import auto_prefill_sms
from deepseek_vl2.engine.slots import kv_bucket
from goldens import CHECKPOINTS


@functools.cache
def chat_engine(checkpoint: str) -> ChatEngine:
    return ChatEngine.load(str(CHECKPOINTS[checkpoint]), device="cpu", dtype=torch.float32)


def conversation(text: str, images) -> list:
    return [{"role": "<|User|>", "content": "<image>\n" * len(images) + text}, {"role": "<|Assistant|>", "content": ""}]


def token_ids_at_the_end(engine, handles) -> list:
    """Step `engine` until it has no work; each handle's answer tokens."""
    while engine.has_work():
        engine.step()
    return [handle.result(timeout=0).token_ids for handle in handles]


RED, GREEN = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (300, 500), (0, 90, 0))
# (text, images, params, steps to run before the next submission)
REQUESTS = [
    ("Describe the image.", [RED], GenerationParams(max_new_tokens=30, temperature=0), 2),
    ("Hello, who are you?", [], GenerationParams(max_new_tokens=12, temperature=0), 0),
    ("Tell a story about a cat.", [], GenerationParams(max_new_tokens=25, temperature=0.8, top_p=0.9, seed=7), 3),
    ("Compare.", [GREEN], GenerationParams(max_new_tokens=20, temperature=0.7, seed=3, repetition_penalty=1.3,
                                           top_k=5), 1),
    ("Count to ten.", [], GenerationParams(max_new_tokens=9, temperature=1.3, top_p=0.5, seed=11, top_k=0,
                                           min_new_tokens=9), 0),
    ("What now?", [RED, GREEN], GenerationParams(max_new_tokens=17, temperature=0), 5),
]


def mixed_requests_through(chat, prefill: PrefillSettings):
    """REQUESTS answered alone by `chat`, and through an engine of 3 slots with `prefill`, submitted
    at their steps and stepped to the end: (engine, handles, single answers)."""
    singles = [chat.chat(conversation(text, images), images, params) for text, images, params, _ in REQUESTS]
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=3, prefill=prefill)
    handles = []
    for text, images, params, steps in REQUESTS:
        handles.append(engine.submit(engine.prepare_one(conversation(text, images), images), params))
        for _ in range(steps):
            engine.step()
    while engine.has_work():
        engine.step()
    return engine, handles, singles


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_equal_their_single_answers(checkpoint):
    # more requests than slots, a small prefill chunk: requests wait, prefill over several steps (their
    # images one tower block per step, then their prompts one decoder layer per step)
    engine, handles, singles = mixed_requests_through(chat_engine(checkpoint),
                                                      PrefillSettings(chunk=64, vision_blocks=1, layer_tokens=1))
    assert engine.stats.layer_pieces > 0 and engine.stats.tower_pieces > 0
    for handle, single in zip(handles, singles):
        result = handle.result(timeout=0)
        assert result.token_ids == single.token_ids
        assert result.text == single.text
        assert (result.finish_reason, result.prompt_tokens) == (single.finish_reason, single.prompt_tokens)
    assert engine.slots.free_count == 3 and engine.stats.max_running == 3
    assert engine.stats.generated_tokens == sum(len(s.token_ids) for s in singles)


def test_stop_strings_and_events():
    chat = chat_engine("tiny_mha")
    conv = conversation("Hello there, tell me more.", [])
    full = chat.chat(conv, [], GenerationParams(max_new_tokens=24, temperature=0))
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"no usable stop string in {full.text!r}"
    expected = chat.chat(conv, [], GenerationParams(max_new_tokens=24, temperature=0, stop=[stop]))
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2)
    events = []
    handle = engine.submit(engine.prepare_one(conv, []), GenerationParams(max_new_tokens=24, temperature=0,
                                                                           stop=[stop]),
                           on_event=lambda kind, value: events.append((kind, value)))
    while engine.has_work():
        engine.step()
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token", "text"}
    result = events[-1][1]
    assert result.finish_reason == "stop" and result.text == expected.text == full.text[:full.text.index(stop)]
    assert result.token_ids == expected.token_ids
    assert "".join(value for kind, value in events if kind == "text") == result.text
    assert [value for kind, value in events if kind == "token"] == result.token_ids
    assert handle.finished


def test_cancellations_free_every_slot():
    chat = chat_engine("tiny_mha")
    prefill = PrefillSettings(vision_blocks=1, layer_tokens=1)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, prefill=prefill)
    sample = engine.prepare_one(conversation("A long answer please.", [RED]), [RED])
    params = GenerationParams(max_new_tokens=50, temperature=0, min_new_tokens=50)
    running, prefilling, waiting, done = (engine.submit(sample, params) for _ in range(4))
    for _ in range(60):  # the second prompt goes one block or layer a step: `running` gets its first token
        engine.step()
        if running.events.qsize():
            break
    assert engine.active == 2 and engine.waiting == 2
    running.cancel()
    prefilling.cancel()
    waiting.cancel()
    engine.step()
    results = [h.result(0) for h in (running, prefilling, waiting)]
    assert [r.finish_reason for r in results] == ["cancelled"] * 3
    assert len(results[0].token_ids) >= 1 and results[1].token_ids == results[2].token_ids == []
    while engine.has_work():
        engine.step()
    last = done.result(0)
    assert last.finish_reason == "length" and len(last.token_ids) == 50
    assert engine.slots.free_count == 2 and not engine.slots.used and engine.active == 0


def test_a_lone_prompt_goes_in_pieces_and_a_queue_is_prefilled_whole():
    chat = chat_engine("tiny_mha")
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=8, prefill=PrefillSettings(layer_tokens=1))
    layers = len(chat.model.language.model.layers)
    sample = engine.prepare_one(conversation("Describe the image.", [RED]), [RED])
    params = GenerationParams(max_new_tokens=40, temperature=0, min_new_tokens=40)
    engine.submit(sample, params)
    engine.step()  # no row decoding: prefilled whole, then its first decode step
    assert not engine.prefill.requests and engine.stats.decode_steps == 1 and engine.stats.whole_prefills == 1
    engine.submit(sample, params)
    engine.step()  # one row decoding: the second's images through the tower (its blocks in one piece)
    second = engine.prefill.requests[0]
    assert second.embeds is not None and second.layers is None and engine.stats.tower_pieces == 1
    engine.step()  # then its first decoder layer
    assert second.layers.layers_left == layers - 1 and engine.stats.layer_pieces == 1
    assert engine.stats.decode_steps == 3 and engine.stats.whole_prefills == 1
    for _ in range(WHOLE_PREFILL_QUEUE - 1):
        engine.submit(sample, params)
    engine.step()  # a queue: the second is prefilled whole (its layers left), then a plain decode step
    assert second not in engine.prefill.requests and engine.stats.max_running == 2
    assert engine.prefill.requests[0].layers is None
    assert (engine.stats.whole_prefills, engine.stats.layer_pieces, engine.stats.decode_steps) == (2, 1, 4)


def test_kv_bucket():
    assert [kv_bucket(n, 4096) for n in (1, 256, 257, 4000, 4096)] == [256, 256, 512, 4096, 4096]
    assert kv_bucket(300, 300) == 300


def test_a_model_moved_after_the_engine_was_built_fails_requests_clearly():
    chat = ChatEngine.load(str(CHECKPOINTS["tiny_mha"]), device="cpu", dtype=torch.float32)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2)
    conv = conversation("Hello.", [])
    handle = engine.submit(engine.prepare_one(conv, []), GenerationParams(max_new_tokens=3, temperature=0))
    chat.model.to(torch.float64)
    while engine.has_work():
        engine.step()
    with pytest.raises(RuntimeError, match="moved or cast to cpu / torch.float64 after this engine was built"):
        handle.result(timeout=0)
    assert engine.slots.free_count == 2


@torch.inference_mode()
def test_a_bare_decoder_gives_the_same_tokens_prefilled_whole_or_in_pieces(tiny_lm):
    """Token-id prompts to an engine over a bare decoder: alone (prefilled whole) and together (the
    later ones one layer a piece between the first one's decode steps), the same greedy tokens."""
    tiny_lm.config.eos_token_id = tiny_lm.config.vocab_size - 1  # the random config's lies outside its vocabulary
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, tiny_lm.config.vocab_size, (n,), generator=generator) for n in (7, 5, 9)]
    params = GenerationParams(max_new_tokens=6, temperature=0, min_new_tokens=6)

    alone = []
    for prompt in prompts:
        engine = ContinuousEngine(tiny_lm, None, max_num_seqs=3, prefill=PrefillSettings(layer_tokens=1))
        alone += token_ids_at_the_end(engine, [engine.submit(prompt, params)])
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=3, prefill=PrefillSettings(layer_tokens=1))
    first = engine.submit(prompts[0], params)
    engine.step()
    handles = [first] + [engine.submit(prompt, params) for prompt in prompts[1:2]]
    engine.step()  # one row decoding, one request waiting: its first layer runs before the step
    assert engine.prefill.requests[0].layers.layers_left == 1
    handles.append(engine.submit(prompts[2], params))
    together = token_ids_at_the_end(engine, handles)
    assert together == alone and all(len(tokens) == 6 for tokens in alone)


@pytest.mark.parametrize("name", ["chunk", "vision_blocks", "layer_tokens"])
def test_piece_sizes_below_one_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        PrefillSettings(**{name: 0})


def test_prompts_are_prefilled_whole_while_no_row_decodes_or_the_engine_is_busy(tiny_lm, monkeypatch):
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=3, prefill=PrefillSettings(layer_tokens=1))
    assert engine.prefills_whole()  # nothing decodes
    engine._running.append(object())
    assert not engine.busy() and not engine.prefills_whole()  # one row, nothing waiting: in pieces
    monkeypatch.setattr(continuous, "WHOLE_PREFILL_QUEUE", 2)
    engine._waiting.extend([object(), object()])
    assert engine.busy() and engine.prefills_whole()  # two waiting
    engine._waiting.clear()
    monkeypatch.setattr(continuous, "PIECEWISE_ROWS", 1)
    assert engine.busy() and engine.prefills_whole()  # as many rows as PIECEWISE_ROWS


def test_another_device_and_sms_set_aside_are_refused_together():
    with pytest.raises(ValueError, match=r"another device \(cuda:1\) or on some SMs of the decoding GPU \(sms=8\)"):
        PrefillSettings(device="cuda:1", sms=8)
    assert PrefillSettings(device="cuda:1", sms="auto").sms == "auto"  # auto yields to another device


@pytest.mark.parametrize("sms", [0, -8, True, "half", 8.0])
def test_sms_set_aside_are_a_count_auto_or_none(sms):
    with pytest.raises(ValueError, match=rf"sms must be a number of SMs >= 1, 'auto' or None, got {sms!r}"):
        PrefillSettings(sms=sms)


def test_the_command_lines_prefill_sms():
    assert [parse_prefill_sms(text) for text in ("auto", "OFF", " 64 ")] == ["auto", None, 64]
    for text in ("0", "half", "-8", ""):
        with pytest.raises(ValueError, match=rf"--prefill-sms takes auto, off or a number of SMs >= 1, not '{text.strip()}'"):
            parse_prefill_sms(text)


def test_sms_auto_prefills_between_the_steps_without_a_gpu(tiny_lm):
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=2, prefill=PrefillSettings(sms="auto"))
    assert isinstance(engine.prefill, Prefill) and "prompts prefilled eagerly" in engine.startup_summary
    assert auto_prefill_sms(torch.device("cpu")) is None


@torch.inference_mode()
def test_a_prompt_half_through_the_decoder_layers_is_finished_whole_when_the_queue_fills(tiny_lm):
    """A prompt in pieces of layers (one of tiny_lm's two) that the queue rule then prefills whole
    gets the tokens it gets alone, as do the requests queued behind it."""
    tiny_lm.config.eos_token_id = tiny_lm.config.vocab_size - 1
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, tiny_lm.config.vocab_size, (n,), generator=generator)
               for n in (6, 8, 5, 7, 4, 9)[: 2 + WHOLE_PREFILL_QUEUE]]
    params = GenerationParams(max_new_tokens=5, temperature=0, min_new_tokens=5)
    settings = PrefillSettings(layer_tokens=1)  # one layer a piece

    alone = []
    for prompt in prompts:
        engine = ContinuousEngine(tiny_lm, None, max_num_seqs=len(prompts), prefill=settings)
        alone += token_ids_at_the_end(engine, [engine.submit(prompt, params)])
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=len(prompts), prefill=settings)
    handles = [engine.submit(prompts[0], params)]
    engine.step()  # no row decoding: prefilled whole
    handles.append(engine.submit(prompts[1], params))
    engine.step()  # one row decoding, one waiting: its first layer rides along
    halfway = engine.prefill.requests[0]
    assert halfway.layers is not None and halfway.layers.layers_left == 1 and engine.stats.layer_pieces == 1
    handles += [engine.submit(prompt, params) for prompt in prompts[2:]]
    engine.step()  # the queue is full: the first waiting prompt is finished whole
    assert halfway not in engine.prefill.requests and engine.stats.whole_prefills == 2
    assert token_ids_at_the_end(engine, handles) == alone and all(len(tokens) == 5 for tokens in alone)


@pytest.mark.parametrize("layer_tokens, pieces", [(8, 2), (11, 2), (12, 1), (100, 1)])
@torch.inference_mode()
def test_a_piece_runs_about_layer_tokens_over_the_prompt(tiny_lm, layer_tokens, pieces):
    """An 8-token prompt through tiny_lm's two layers: round(layer_tokens / 8) layers a piece."""
    tiny_lm.config.eos_token_id = tiny_lm.config.vocab_size - 1
    params = GenerationParams(max_new_tokens=4, temperature=0, min_new_tokens=4)
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=2, prefill=PrefillSettings(layer_tokens=layer_tokens))
    engine.submit(torch.arange(5), params)
    engine.step()  # no row decoding: prefilled whole
    engine.submit(torch.arange(8), params)
    for piece in range(1, pieces + 1):
        engine.step()
        assert engine.stats.layer_pieces == piece and len(engine.prefill.requests) == (piece < pieces)
    assert engine.stats.max_running == 2 and engine.stats.whole_prefills == 1


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_a_request_that_fails_on_nan_leaves_its_slot_clean(checkpoint):
    """NaN images (what a float16 overflow makes) fail their request; the next request in the same
    slot reads none of it (masked positions multiply what lies there: 0 * NaN is NaN) and gives its
    answer alone."""
    chat = chat_engine(checkpoint)
    poisoned = chat.prepare_one(conversation("Describe.", [RED]), [RED])
    poisoned.images = torch.full_like(poisoned.images, float("nan"))
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=1)
    failing = engine.submit(poisoned, GenerationParams(max_new_tokens=8, temperature=0))
    while engine.has_work():
        engine.step()
    with pytest.raises(ValueError, match="the scores hold NaN or inf"):
        failing.result(timeout=0)
    params = GenerationParams(max_new_tokens=8, temperature=0)
    question = conversation("Hello there, tell me more.", [])
    after = engine.submit(engine.prepare_one(question, []), params)
    assert token_ids_at_the_end(engine, [after]) == [chat.chat(question, [], params).token_ids]


def test_a_close_that_times_out_mid_step_still_ends_every_request():
    """close(timeout_s) returns while the loop is inside a step; the loop ends the requests (an error
    event each) and frees the slots when the step is over."""
    chat = chat_engine("tiny_mha")
    big = Image.new("RGB", (640, 480), (200, 30, 30))
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=1)
    sample = engine.prepare_one(conversation("Describe the image in detail.", [big, big]), [big, big])
    entered = threading.Event()
    engine.after_step = entered.set
    engine.start()
    handles = [engine.submit(sample, GenerationParams(max_new_tokens=20, temperature=0)) for _ in range(3)]
    assert entered.wait(60)
    engine.close(timeout_s=0.001)
    for handle in handles:
        with pytest.raises(RuntimeError, match="shutting down"):
            handle.result(timeout=60)
    engine.close()  # joins the loop's thread, which ended the requests as it stopped
    assert not engine.alive and not engine.has_work() and engine.slots.free_count == 1


def test_an_on_event_that_raises_cancels_only_its_own_request():
    """A caller's callback that raises (a client gone, say) cancels its own request and keeps the
    exception; the other rows get every token they get alone, stepped by hand or by the loop."""
    chat = chat_engine("tiny_mha")
    params = GenerationParams(max_new_tokens=10, temperature=0)
    question = conversation("Hello, who are you?", [])
    alone = chat.chat(question, [], params).token_ids

    def raising_at_the_third_token():
        tokens = []

        def on_event(kind, value):
            tokens.extend([value] if kind == "token" else [])
            if len(tokens) == 3:
                raise BrokenPipeError("client went away")
        return on_event

    for threaded in (False, True):
        engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=3)
        sample = engine.prepare_one(question, [])
        if threaded:
            engine.start()
        good = [engine.submit(sample, params) for _ in range(2)]
        bad = engine.submit(sample, params, on_event=raising_at_the_third_token())
        if not threaded:
            while engine.has_work():
                engine.step()
        assert [handle.result(timeout=60).token_ids for handle in good] == [alone, alone]
        assert isinstance(bad.callback_error, BrokenPipeError) and bad.cancelled
        engine.close()
        assert engine.slots.free_count == 3


def test_chat_batch_raises_a_rows_on_text_error_and_leaves_no_row_behind():
    """An on_text that raises is that row's error, raised after the other rows have ended; a call
    interrupted mid-way (KeyboardInterrupt) leaves nothing running for the next call."""
    from deepseek_vl2.engine import BatchRow

    chat = chat_engine("tiny_mha")
    question = conversation("Hello, who are you?", [])
    params = GenerationParams(max_new_tokens=10, temperature=0)
    alone = chat.chat(question, [], params).token_ids
    sample = chat.prepare_one(question, [])
    pieces = []

    def failing_on_text(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise ValueError("on_text failed")

    with pytest.raises(ValueError, match="on_text failed"):
        chat.chat_batch([BatchRow(sample, params), BatchRow(sample, params, on_text=failing_on_text)])
    engine = chat.continuous_engine(1)
    assert not engine.has_work() and engine.active == 0

    steps = []
    original_step = engine.step

    def interrupted_step():
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        original_step()

    engine.step = interrupted_step
    try:
        with pytest.raises(KeyboardInterrupt):
            chat.chat_batch([BatchRow(sample, params), BatchRow(sample, params)])
    finally:
        del engine.step
    assert not engine.has_work() and engine.active == 0 and engine.slots.free_count == engine.slots.max_num_seqs
    assert [result.token_ids for result in chat.chat_batch([BatchRow(sample, params)])] == [alone]
    assert len(pieces) == 2  # the failed row's on_text was not called again
