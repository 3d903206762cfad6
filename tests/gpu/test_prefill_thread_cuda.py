"""Prefill on a second GPU (prefill_thread.py; skipped without two): mixed requests decoded through
cuda:0's graphs with their prompts prefilled by cuda:1's copy of the model give their single-request
answers (a difference only at a recorded near-tie), nothing is compiled or captured after start-up,
and every slot and buffer row is free at the end. The same with the prompts prefilled on the decoding
GPU itself, on SMs set aside for them beside the steps (a green context; one GPU). Prefill on the
decoding GPU without SMs set aside is refused."""
import time

import pytest
import torch
from test_continuous_graphs import assert_single_answers, chat_engine, conversation, singles_and_engine

from deepseek_vl2.engine import PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.decode_steps import compilations

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def served_on_threads(checkpoint: str, prefill: PrefillSettings, record_property):
    """The mixed requests through an engine whose prompts `prefill` puts on a thread of their own, with
    the loop on its thread: each gets its single answer, nothing is compiled or captured after
    start-up, nothing is left between the threads and every slot is free at the end. The engine."""
    chat, requests, singles, engine = singles_and_engine(checkpoint, prefill)
    compiled = compilations()
    engine.start()
    handles = [engine.submit(engine.prepare_one(conversation(text, images), images), params)
               for text, images, params in requests]
    deadline = time.monotonic() + 120
    while not all(handle.finished for handle in handles) and time.monotonic() < deadline:
        time.sleep(0.05)  # each result stays queued for the check below
    assert engine.prefill._todo.empty() and not engine.prefill._done and not engine.prefill.requests
    engine.close()
    assert engine.steps.eager_steps == 0 and compilations() == compiled
    assert engine.slots.free_count == 4 and engine.stats.max_running >= 2
    assert engine.stats.whole_prefills == engine.stats.tower_pieces == engine.stats.layer_pieces == 0
    assert_single_answers(chat, requests, handles, singles, record_property)
    return engine


@two_gpus
@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_prefilled_on_the_second_gpu(checkpoint, record_property):
    engine = served_on_threads(checkpoint, PrefillSettings(device="cuda:1"), record_property)
    assert {p.device for p in engine.prefill.model.parameters()} == {torch.device("cuda", 1)}


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_prefilled_beside_the_steps(checkpoint, record_property):
    """With sms="auto" (the server's default): half the GPU's SMs, a multiple of 8 (an H200: 64 of 132)."""
    total = torch.cuda.get_device_properties(0).multi_processor_count
    engine = served_on_threads(checkpoint, PrefillSettings(sms="auto"), record_property)
    assert engine.prefill.model is engine.model and engine.prefill.prompt is engine.slots.prompt
    assert f"beside the decode steps on {total // 16 * 8} of the {total} SMs" in engine.startup_summary
    assert engine.startup_summary.count("captured 10 vision-tower graphs (1 to 10 tiles)") == 2  # one set per lane
    assert engine.prefill.tower_graphs == 20


def test_beside_the_steps_a_prompt_runs_on_the_sms_set_aside_while_rows_decode(record_property):
    sms = torch.cuda.get_device_properties(0).multi_processor_count // 2
    chat, requests, singles, engine = singles_and_engine("tiny_mha", PrefillSettings(sms=sms))
    (long, short), chosen = (requests[5], requests[0]), (singles[5], singles[0])
    engine.start()
    handles = [engine.submit(engine.prepare_one(conversation(long[0], long[1]), long[1]), long[2])]
    deadline = time.monotonic() + 60
    while not engine._running and time.monotonic() < deadline:  # the first prompt decodes: the engine is quiet
        time.sleep(0.01)
    handles.append(engine.submit(engine.prepare_one(conversation(short[0], short[1]), short[1]), short[2]))
    while not all(handle.finished for handle in handles) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.close()
    assert (engine.prefill.whole_gpu.prompts, engine.prefill.set_aside.prompts) == (1, 1)
    assert_single_answers(chat, [long, short], handles, chosen, record_property)


def test_prefill_on_the_decoding_gpu_is_refused():
    chat = chat_engine("tiny_mha")
    with pytest.raises(ValueError, match="another device than the model's"):
        ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, max_length=512,
                         prefill=PrefillSettings(device="cuda"))
