"""Quantized fixture models against plain round-to-nearest (RTN) at the same bits and grouping,
computed here from the checkpoint's own tensors: a quantized model's logits must be at least as close
to the unquantized model's as those of the model whose weights were RTN-rounded and loaded back.

The shared experts run as extra experts, so their down projection [h, S*I] is quantized as S blocks
of I input columns, one per shared expert (docs/deviations.md); the RTN here does the same."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_vl2.models import DeepseekVLV2ForCausalLM
from deepseek_vl2.quantization.config import QuantizationConfig
from goldens import CHECKPOINTS, rel_err

# the official tensors the issue asks to quantize: attention projections (not kv_b_proj), dense MLP, experts
QUANTIZED_KEY = re.compile(r"language\.model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|k_proj|v_proj|"
                           r"kv_a_proj_with_mqa|o_proj)|mlp\.(.*\.)?(gate_proj|up_proj|down_proj))\.weight")


def rtn(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Plain RTN of one official tensor, rows along its last dim: int8 symmetric per row; int4
    asymmetric min/max per group of 128 columns (the largest power of two dividing the row below that)."""
    w = weight.float()
    if scheme == "int8":
        step = w.abs().amax(-1, keepdim=True) / 127
        return (w / step).round().clamp(-127, 127) * step
    group = 128
    while w.shape[-1] % group:
        group //= 2
    groups = w.view(*w.shape[:-1], -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    return (((groups - low) / step).round().clamp(0, 15) * step + low).view(w.shape)


def rtn_checkpoint(source, target, scheme, lm_head=False):
    """A copy of the checkpoint in `source` with every quantized tensor RTN-rounded (in float32); with
    `lm_head`, the LM head too, in int8."""
    shutil.copytree(source, target)
    expert_width = json.loads((source / "config.json").read_text())["language_config"]["moe_intermediate_size"]
    rounded = 0
    for file in target.glob("*.safetensors"):
        tensors = load_file(str(file))
        for key, tensor in tensors.items():
            if key.endswith("shared_experts.down_proj.weight"):  # per shared expert: [h, S, I] blocks
                h = tensor.shape[0]
                tensors[key] = rtn(tensor.view(h, -1, expert_width), scheme).view(h, -1)
                rounded += 1
            elif QUANTIZED_KEY.fullmatch(key):
                tensors[key] = rtn(tensor, scheme)
                rounded += 1
            elif lm_head and key == "language.lm_head.weight":
                tensors[key] = rtn(tensor, "int8")
                rounded += 1
        save_file(tensors, str(file), metadata={"format": "pt"})
    return rounded


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_quantized_logits_within_round_to_nearest_error(name, scheme, tmp_path):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    full = logits(DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.float32), ids)
    assert rtn_checkpoint(CHECKPOINTS[name], tmp_path / "rtn", scheme) >= 3 * 4  # every layer's attention + MLP
    plain_rtn = logits(DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "rtn", dtype=torch.float32), ids)
    quantized = logits(DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.float32,
                                                               quantization=scheme), ids)
    rtn_error, error = rel_err(plain_rtn, full), rel_err(quantized, full)
    print(f"{name} {scheme}: quantized {error:.4g}, plain RTN {rtn_error:.4g}")
    assert rtn_error > 1e-4  # the rounding is visible at all
    assert error <= rtn_error * 1.01 + 1e-6


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_quantized_lm_head_within_round_to_nearest_error(name, tmp_path):
    """int4 layers and the LM head in int8 against RTN of both; the head's rounding adds to the error."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    full = logits(DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.float32), ids)
    layers_only = rtn_checkpoint(CHECKPOINTS[name], tmp_path / "layers", "int4")
    assert rtn_checkpoint(CHECKPOINTS[name], tmp_path / "rtn", "int4", lm_head=True) == layers_only + 1
    plain_rtn = logits(DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "rtn", dtype=torch.float32), ids)
    layers_rtn = logits(DeepseekVLV2ForCausalLM.from_pretrained(tmp_path / "layers", dtype=torch.float32), ids)
    config = QuantizationConfig("int4", lm_head=True)
    model = DeepseekVLV2ForCausalLM.from_pretrained(CHECKPOINTS[name], dtype=torch.float32, quantization=config)
    assert model.language.lm_head.weight.scheme == "int8"
    rtn_error, error = rel_err(plain_rtn, full), rel_err(logits(model, ids), full)
    print(f"{name} int4 + int8 head: quantized {error:.4g}, plain RTN {rtn_error:.4g}")
    assert not torch.equal(plain_rtn, layers_rtn)  # the head's rounding is in the reference
    assert error <= rtn_error * 1.01 + 1e-6


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_quantized_model_on_the_cpu(scheme):
    """In bf16 (scales and zero points too) a quantized model is as close to the float32 model as the
    float32 quantized one, give or take twice the bf16 model's own rounding."""
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    path = CHECKPOINTS["tiny_mha"]
    full = logits(DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32), ids)
    bf16_noise = rel_err(logits(DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16), ids), full)
    fp32_error = rel_err(logits(DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                        quantization=scheme), ids), full)
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization=scheme)
    assert model.language.model.layers[1].mlp.experts.gate_up_proj.scale.dtype == torch.bfloat16
    assert rel_err(logits(model, ids), full) <= fp32_error + 2 * bf16_noise
