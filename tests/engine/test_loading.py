"""The one loading path: `ChatEngine.load` and `utils.io.load_pretrained_model` both go through
`engine.load_model_and_processor`, so the same device and dtype give the same model, placed alike."""
import pytest
import torch

from deepseek_vl2.engine import ChatEngine, load_model_and_processor
from deepseek_vl2.engine.loading import default_dtype
from deepseek_vl2.utils.io import load_pretrained_model
from goldens import CHECKPOINTS

PATH = str(CHECKPOINTS["tiny_mha"])


def placement(model):
    return {(p.device.type, p.dtype) for p in model.parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_public_loaders_place_the_model_alike(dtype):
    engine = ChatEngine.load(PATH, device="cpu", dtype=dtype)
    tokenizer, processor, model = load_pretrained_model(PATH, dtype=dtype, device="cpu")
    assert placement(engine.model) == placement(model) == {("cpu", dtype)}
    assert not engine.model.training and not model.training
    assert tokenizer is processor.tokenizer
    assert processor.image_token_id == engine.processor.image_token_id
    for (name, a), (_, b) in zip(engine.model.state_dict().items(), model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_defaults():
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda:1") == torch.bfloat16
    processor, model = load_model_and_processor(PATH, device="cpu")
    assert placement(model) == {("cpu", torch.float32)} and processor.pad_id is not None
    # load_pretrained_model keeps the reference's bf16 default
    *_, model = load_pretrained_model(PATH, device="cpu")
    assert placement(model) == {("cpu", torch.bfloat16)}
