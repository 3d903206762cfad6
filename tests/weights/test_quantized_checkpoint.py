"""Quantized models and checkpoints: quantize-while-loading stays strict, save_pretrained writes a
quantized checkpoint (smaller on disk, the scheme in config.json) that reloads to equal logits."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.swap import quantize_modules
from deepseek_vl2.weights.hub import CheckpointError
from deepseek_vl2.weights.layout import official_shapes, stored_layout
from goldens import CHECKPOINTS, FIXTURES

IDS = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def disk_bytes(folder, keys):
    """Bytes of the tensors of the checkpoint in `folder` whose names `keys` accepts."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if keys(key):
                    t = f.get_slice(key)
                    total += torch.Size(t.get_shape()).numel() * (1 if t.get_dtype() in ("I8", "U8") else 2)
    return total


# the fixtures' layers are narrow (32 to 160 columns), so scales weigh more than at real sizes: int8
# stores 1 + 2/K bytes per weight against bf16's 2, int4 1/2 + 4/group with groups of 32 or more
@pytest.mark.parametrize("scheme,ratio", [("int8", 0.57), ("int4", 0.32)])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_save_and_reload_without_the_argument(name, scheme, ratio, tmp_path):
    model = DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.bfloat16, quantization=scheme)
    model.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())
    assert stored["quantization_config"] == {"quant_method": "deepseek_vl2", "scheme": scheme, "group_size": 128,
                                             "lm_head": False}
    assert stored.get("dtype", stored.get("torch_dtype")) == "bfloat16"
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded), logits(model))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), trust_remote_code=True)  # as the parity tools load
    assert torch.equal(logits(again), logits(model))
    # the same model saved unquantized, in the same dtype: the quantized weights at about bits/16 of their size
    DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.bfloat16).save_pretrained(tmp_path / "f")
    parts = {key.rpartition(".")[0] for key in stored_layout(model) if key.endswith(".qweight")}
    quantized = disk_bytes(tmp_path / "q", lambda key: key.rpartition(".")[0] in parts)
    assert 0 < quantized < ratio * disk_bytes(tmp_path / "f", lambda key: key in parts)
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in (tmp_path / "f").glob("*.safetensors"))


def test_quantized_lm_head_saved_and_reloaded(tmp_path):
    config = QuantizationConfig("int4", lm_head=True)
    model = DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS["small_mla"], dtype=torch.bfloat16,
                                                    quantization=config)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored == {"quant_method": "deepseek_vl2", "scheme": "int4", "group_size": 128, "lm_head": True}
    tensors = load_file(str(tmp_path / "model.safetensors"))
    head = model.language.lm_head.weight
    assert tensors["language.lm_head.weight.qweight"].dtype == torch.int8
    assert tensors["language.lm_head.weight.scale"].shape == (head.shape[0], 1)  # one scale per vocabulary row
    assert "language.lm_head.weight" not in tensors and "language.lm_head.weight.zero" not in tensors
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path)
    assert reloaded.language.lm_head.weight.scheme == "int8"
    assert torch.equal(logits(reloaded), logits(model))
    assert torch.equal(logits(DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, quantization=config)), logits(model))


def test_stored_tensor_names_and_a_second_scheme_refused(tmp_path):
    model = DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS["small_mla"], dtype=torch.float32,
                                                    quantization="int4")
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    prefix = "language.model.layers.1.mlp."
    h, I, S = 64, 32, 2
    assert tensors[prefix + "experts.3.up_proj.weight.qweight"].shape == (I, h // 2)
    assert tensors[prefix + "experts.3.down_proj.weight.scale"].shape == (h, 1)  # groups of 32 of I = 32
    assert tensors[prefix + "shared_experts.down_proj.weight.qweight"].shape == (h, S * I // 2)
    assert tensors[prefix + "shared_experts.down_proj.weight.zero"].shape == (h, S)
    assert prefix + "experts.3.up_proj.weight" not in tensors and prefix + "gate.weight" in tensors
    assert tensors["language.model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="quantized as int4 in groups of 128; it cannot be loaded as int8:"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, quantization="int8")
    with pytest.raises(ValueError, match="cannot be loaded as int4 in groups of 128, the LM head in int8:"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, quantization=QuantizationConfig("int4", lm_head=True))
    same = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, quantization="int4")
    assert torch.equal(logits(same), logits(model))


def test_loading_stays_strict(tmp_path):
    source = CHECKPOINTS["tiny_mha"]
    for file in source.iterdir():
        (tmp_path / "full").mkdir(exist_ok=True)
        (tmp_path / "full" / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(tmp_path / "full" / "model.safetensors"))
    del tensors["language.model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(tmp_path / "full" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing tensors: language\.model\.layers\.1\.mlp\.experts\.5\.up_"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "full", quantization="int8")
    model = DeepseekVLV2ForCausalLM.from_pretrained(source, quantization="int8")
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    del tensors["language.model.layers.2.self_attn.o_proj.weight.scale"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: language\.model\.layers\.2\.self_attn\.o_proj\."
                                              r"weight\.scale"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "q")


def test_stored_parts_with_the_wrong_dtype_are_named(tmp_path):
    """A quantized checkpoint's integer parts must be stored exactly as they are held: a float32 or
    int32 `.qweight` would otherwise be converted into garbage; its scales may be any floating dtype."""
    DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS["tiny_mha"], quantization="int4").save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    as_float, as_int32 = (f"language.model.layers.{i}.self_attn.o_proj.weight.qweight" for i in (0, 2))
    tensors[as_float] = tensors[as_float].to(torch.float32)
    tensors[as_int32] = tensors[as_int32].to(torch.int32) + 256  # values outside uint8
    scale = "language.model.layers.1.self_attn.o_proj.weight.scale"
    tensors[scale] = tensors[scale].to(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"2 tensors with the wrong dtype: " + re.escape(
            f"{as_float}: checkpoint float32, expected uint8, {as_int32}: checkpoint int32, expected uint8") + "$"):
        DeepseekVLV2ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_real_releases_load_quantized(variant):
    """Quantized on the meta device, each release still maps onto exactly its official names and
    shapes (so the hub checkpoints quantize while loading), and its stored layout names every
    quantized part once."""
    folder = FIXTURES / "real_shapes" / variant
    expected = {k: tuple(v) for k, v in json.loads((folder / "state_dict_layout.json").read_text())
                ["state_dict"].items()}
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(str(folder)))
    quantize_modules(model.to(torch.bfloat16), QuantizationConfig("int4"), torch.bfloat16)
    assert official_shapes(model) == expected
    stored = stored_layout(model)
    assert {where.param for where in stored.values()} == {name for name, _ in model.named_parameters()}
    experts = "language.model.layers.5.mlp.experts."
    assert stored["language.model.layers.5.mlp.experts.9.down_proj.weight.zero"].param == experts + "down_proj.zero"
    assert len(stored) == len(expected) + 2 * sum(k.startswith("language.model.layers.") and k.endswith((
        "proj.weight", "proj_with_mqa.weight")) and "kv_b_proj" not in k for k in expected)


def test_device_maps_plan_with_the_quantized_size():
    """accelerate's planning counts the integer parameters at their own size: small in int4 fits two
    6 GiB budgets, in bf16 it does not."""
    from deepseek_vl2.weights.placement import resolve_device_map

    budgets = {0: "6GiB", 1: "6GiB"}
    for scheme in (None, "int4"):
        with torch.device("meta"):
            model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / "small")))
        model = model.to(torch.bfloat16)
        if scheme is None:
            with pytest.raises(ValueError, match="does not fit"):
                resolve_device_map("balanced", model, torch.bfloat16, max_memory=budgets, gpu_count=2)
            continue
        quantize_modules(model, QuantizationConfig(scheme), torch.bfloat16)
        placement = resolve_device_map("balanced", model, torch.bfloat16, max_memory=budgets, gpu_count=2)
        assert {str(d) for d in placement.values()} == {"cuda:0", "cuda:1"}


def test_sharded_quantized_checkpoint(tmp_path):
    model = DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS["base_noaux"], dtype=torch.bfloat16,
                                                    quantization="int4")
    model.save_pretrained(tmp_path, max_shard_size=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "language.model.layers.2.mlp.shared_experts.down_proj.weight.zero" in index["weight_map"]
    assert torch.equal(logits(DeepseekVLV2ForCausalLM.from_pretrained(tmp_path)), logits(model))
