"""quantization/swap.py: which weights are quantized and which stay in the activation dtype."""
import pytest
import torch

from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.linear import QuantizedLinear
from deepseek_vl2.quantization.swap import quantize_modules
from deepseek_vl2.quantization.weight import QuantizedWeight
from goldens import FIXTURES


@pytest.mark.parametrize("variant,share", [("tiny", 0.77), ("small", 0.93)])
def test_quantized_and_kept_weights_of_the_real_models(variant, share):
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / variant)))
    model = model.to(torch.bfloat16)
    full = {name: p.numel() for name, p in model.named_parameters()}
    quantize_modules(model, QuantizationConfig("int4"), torch.bfloat16)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    layer = model.language.model.layers[1]
    assert isinstance(layer.mlp.experts.gate_up_proj, QuantizedWeight)
    assert isinstance(layer.mlp.experts.down_proj, QuantizedWeight)
    assert isinstance(model.language.model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert isinstance(layer.self_attn.o_proj, QuantizedLinear)
    # only decoder-layer weights, never embeddings, norms, router, LM head, vision, projector, kv_b_proj
    assert all(name.startswith("language.model.layers.") for name in quantized)
    assert not any(n.endswith(("kv_b_proj.weight", "gate.weight", "layernorm.weight")) for n in quantized)
    assert model.language.lm_head.weight.dtype == torch.bfloat16
    assert sum(full[name] for name in full if name in quantized) / sum(full.values()) > share  # of all weights
    bits = sum(p.numel() * p.element_size() * 8 for p in model.parameters())
    kept = sum(n for name, n in full.items() if name not in quantized)
    per_weight = (bits - 16 * kept) / sum(full[name] for name in quantized)
    assert 4.2 < per_weight < 4.3  # 4 bits + a bf16 scale and zero per 128 (per 64 in the dense MLP)


def test_the_lm_head_quantized_to_int8_on_request():
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / "small")))
    quantize_modules(model.to(torch.bfloat16), QuantizationConfig("int4", lm_head=True), torch.bfloat16)
    head = model.language.lm_head
    assert isinstance(head, QuantizedLinear) and head.weight.scheme == "int8" and head.bias is None
    assert head.weight.qweight.shape == (129280, 2048) and head.weight.scale.shape == (129280, 1)
    assert model.language.dtype == torch.bfloat16
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantizedWeight)]
    assert [name for name in quantized if not name.startswith("language.model.layers.")] == ["language.lm_head.weight"]
    assert model.language.model.embed_tokens.weight.dtype == torch.bfloat16
