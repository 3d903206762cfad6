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


def test_quantization_from_the_command_lines():
    """--quantization of inference.py, the server and the web demo (with gradio installed) reaches
    from_pretrained: all three parse it through add_engine_arguments and load through from_args."""
    import importlib.util

    import inference
    from deepseek_vl2.quantization.weight import QuantizedWeight
    from deepseek_vl2.serve.__main__ import parse_args as serve_args

    parsers = [inference.parse_args, serve_args]
    if importlib.util.find_spec("gradio") is not None:
        import web_demo

        parsers.append(web_demo.parse_args)
    for parse in parsers:
        args = parse(["--model_path", PATH, "--device", "cpu", "--quantization", "int4"])
        assert args.quantization == "int4"
    assert inference.parse_args(["--model_path", PATH]).quantization is None
    engine = ChatEngine.from_args(PATH, args)
    experts = engine.model.language.model.layers[1].mlp.experts
    assert isinstance(experts.gate_up_proj, QuantizedWeight) and experts.gate_up_proj.scheme == "int4"
    with pytest.raises(SystemExit):
        inference.parse_args(["--model_path", PATH, "--quantization", "int2"])
