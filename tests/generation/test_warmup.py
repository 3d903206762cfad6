"""The load-time warm-up (deepseek_vl2/generation/warmup.py): its dummy answers run through the real
paths without leaving anything a caller sees (the global RNG, later answers)."""
import pytest
import torch

from deepseek_vl2.generation import cuda_graphs, warmup
from deepseek_vl2.models import DeepseekVLV2ForCausalLM
from goldens import checkpoint_dir, fixture_model, golden_inputs


def test_dummy_answers_leave_the_global_rng_alone():
    model = fixture_model("tiny_mha")
    state = torch.get_rng_state()
    warmup.dummy_answers(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_warm_up_is_a_no_op_off_the_gpu(monkeypatch):
    model = fixture_model("tiny_mha")
    monkeypatch.setattr(warmup, "dummy_answers", lambda m: pytest.fail("dummy answers ran on the CPU"))
    warmup.warm_up(model)
    assert warmup.start_background_work(torch.device("cpu")) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loading_on_the_gpu_warms_up_and_answers_as_without():
    case = "p01_single_640x480"

    def load(warm):
        return DeepseekVLV2ForCausalLM.from_pretrained(str(checkpoint_dir(case)), dtype=torch.bfloat16,
                                                       device_map="cuda", progress=False, warm_up=warm)

    cpu_state, gpu_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    warmed = load(True)
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), gpu_state)
    decoder = cuda_graphs._DECODERS[warmed.language][1][1]  # the batch-1 decoder, graphs captured
    assert decoder.graphs
    cold = load(False)
    assert cold.language not in cuda_graphs._DECODERS
    inputs = {k: v.cuda() for k, v in golden_inputs(case).items()}
    inputs["images"] = inputs["images"].bfloat16()
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(warmed.generate(**inputs, **kw), cold.generate(**inputs, **kw))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float32_on_the_gpu_decodes_with_plain_kernels_without_a_failed_capture(caplog):
    """float32 grouped GEMMs on CUDA read back to the host, so no graph is attempted (an attempt
    would fail and warn)."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(checkpoint_dir("p01_single_640x480")), dtype=torch.float32,
                                                    device_map="cuda", progress=False)
    assert model.language not in cuda_graphs._DECODERS
    assert not [r for r in caplog.records if "capture" in r.getMessage()]
