"""Prefill on a second GPU (remote_prefill.py; skipped without two): mixed requests decoded through
cuda:0's graphs with their prompts prefilled by cuda:1's copy of the model give their single-request
answers (a difference only at a recorded near-tie), nothing is compiled or captured after start-up,
and every slot and buffer row is free at the end. Prefill on the decoding GPU itself is refused."""
import time

import pytest
import torch
from test_continuous_graphs import assert_single_answers, chat_engine, conversation, singles_and_engine

from deepseek_vl2.engine import PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.decode_steps import compilations

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_prefilled_on_the_second_gpu(checkpoint, record_property):
    chat, requests, singles, engine = singles_and_engine(checkpoint, PrefillSettings(device="cuda:1"))
    assert {p.device for p in engine.prefill.model.parameters()} == {torch.device("cuda", 1)}
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
    assert_single_answers(chat, requests, handles, singles, record_property)


def test_prefill_on_the_decoding_gpu_is_refused():
    chat = chat_engine("tiny_mha")
    with pytest.raises(ValueError, match="another device than the model's"):
        ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, max_length=512,
                         prefill=PrefillSettings(device="cuda"))
