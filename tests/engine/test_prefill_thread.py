"""The continuous engine with its prompts prefilled by another device's copy of the model
(prefill_thread.py), on the CPU: the prefill thread runs beside the engine's and hands over each
prompt's cache and logits, and every request gets exactly what `ChatEngine.chat` gives it alone;
cancelled and failing prompts end alone and free their slots. Two GPUs: tests/gpu/test_prefill_thread_cuda.py."""
import time

import pytest
import torch
from test_continuous import RED, chat_engine, conversation, mixed_requests_through, token_ids_at_the_end

from deepseek_vl2.engine import GenerationParams, PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine

ON_CPU = PrefillSettings(chunk=64, device="cpu")


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_prefilled_elsewhere_equal_their_single_answers(checkpoint):
    chat = chat_engine(checkpoint)
    engine, handles, singles = mixed_requests_through(chat, ON_CPU)
    assert engine.prefill.model is not chat.model and "prompts prefilled on cpu" in engine.startup_summary
    results = [handle.result(timeout=0) for handle in handles]
    for result, single in zip(results, singles):
        assert (result.token_ids, result.text, result.finish_reason) == (single.token_ids, single.text,
                                                                         single.finish_reason)
    assert engine.slots.free_count == 3 and engine.stats.max_running == 3
    assert engine.stats.whole_prefills == engine.stats.tower_pieces == engine.stats.layer_pieces == 0
    assert engine.prefill._todo.empty() and not engine.prefill._done  # nothing left between the threads
    engine.close()
    assert not engine.prefill._thread.is_alive()


def test_the_loop_thread_waits_for_prefills_and_streams_the_answers():
    chat = chat_engine("tiny_mha")
    conv = conversation("Describe the image.", [RED])
    params = GenerationParams(max_new_tokens=12, temperature=0)
    single = chat.chat(conv, [RED], params)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, prefill=ON_CPU)
    engine.start()
    handles = [engine.submit(engine.prepare_one(conv, [RED]), params) for _ in range(5)]
    results = [handle.result(timeout=60) for handle in handles]
    engine.close()
    assert all(result.token_ids == single.token_ids for result in results)
    assert engine.stats.finished == 5 and engine.slots.free_count == 2


def test_cancelled_requests_end_wherever_their_prefill_is():
    chat = chat_engine("tiny_mha")
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=3, prefill=ON_CPU)
    sample = engine.prepare_one(conversation("A long answer please.", [RED]), [RED])
    params = GenerationParams(max_new_tokens=30, temperature=0, min_new_tokens=30)
    handles = [engine.submit(sample, params) for _ in range(4)]
    engine.step()  # three admitted and handed to the prefill thread, one waiting for a slot
    for handle in handles[1:]:
        handle.cancel()
    deadline = time.monotonic() + 60
    while engine.has_work() and time.monotonic() < deadline:
        engine.step()
    results = [handle.result(timeout=0) for handle in handles]
    assert results[0].finish_reason == "length" and len(results[0].token_ids) == 30
    assert [r.finish_reason for r in results[1:]] == ["cancelled"] * 3
    assert engine.slots.free_count == 3 and not engine.prefill.requests
    assert engine.prefill._todo.empty() and not engine.prefill._done
    engine.close()


@torch.inference_mode()
def test_a_prompt_that_fails_there_fails_alone(tiny_lm):
    tiny_lm.config.eos_token_id = tiny_lm.config.vocab_size - 1  # the random config's lies outside its vocabulary
    params = GenerationParams(max_new_tokens=5, temperature=0, min_new_tokens=5)
    good = torch.tensor([3, 1, 4, 1, 5])
    bad = torch.tensor([2, tiny_lm.config.vocab_size + 7])  # an id beyond the embedding table
    alone = ContinuousEngine(tiny_lm, None, max_num_seqs=2)
    expected = token_ids_at_the_end(alone, [alone.submit(good, params)])
    engine = ContinuousEngine(tiny_lm, None, max_num_seqs=2, prefill=ON_CPU)
    handles = [engine.submit(bad, params), engine.submit(good, params)]
    while engine.has_work():
        engine.step()
    with pytest.raises(IndexError):
        handles[0].result(timeout=0)
    assert handles[1].result(timeout=0).token_ids == expected[0]
    assert engine.stats.failed == 1 and engine.slots.free_count == 2
    assert engine.prefill._todo.empty() and not engine.prefill._done
    engine.close()


def test_the_loop_waits_for_the_prefill_thread_instead_of_spinning(monkeypatch):
    """With no row decoding and every slot taken by a prompt prefilling elsewhere (more requests
    waiting), the engine's loop waits for the prefill thread rather than stepping in a busy loop."""
    chat = chat_engine("tiny_mha")
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=1, prefill=ON_CPU)
    layers = engine.prefill._layers

    def slow_layers(embeds, graphs):
        time.sleep(0.5)
        return layers(embeds, graphs)

    monkeypatch.setattr(engine.prefill, "_layers", slow_layers)
    steps = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(step()))
    sample = engine.prepare_one(conversation("Hello.", []), [])
    engine.start()
    handles = [engine.submit(sample, GenerationParams(max_new_tokens=2, temperature=0)) for _ in range(3)]
    results = [handle.result(timeout=60) for handle in handles]
    engine.close()
    assert all(len(result.token_ids) == 2 for result in results)
    assert len(steps) < 200, f"{len(steps)} iterations for 1.5 s of prefill and 6 tokens"


def test_sms_set_aside_need_the_model_on_a_gpu():
    chat = chat_engine("tiny_mha")
    with pytest.raises(ValueError, match=r"SMs set aside for prefill \(sms=4\) are SMs of the model's GPU, and it is on cpu"):
        ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, prefill=PrefillSettings(sms=4))
