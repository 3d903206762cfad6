"""quantization/config.py: schemes, group sizes per layer width, the stored form."""
import pytest

from deepseek_vl2.quantization.config import QuantizationConfig, parse_quantization


def test_group_sizes_of_the_real_layer_widths():
    int4 = QuantizationConfig("int4")
    # hidden sizes and expert widths of tiny/small/base take groups of 128; the dense MLPs of tiny
    # (6848 = 64 x 107) and small (10944 = 64 x 171) the largest power of two that divides them
    assert [int4.group_for(k) for k in (1280, 2048, 2560, 896, 1408, 1536, 12288)] == [128] * 7
    assert int4.group_for(6848) == 64 and int4.group_for(10944) == 64
    assert int4.group_for(160) == 32 and QuantizationConfig("int4", 32).group_for(2048) == 32
    assert QuantizationConfig("int8").group_for(6848) == 6848  # one scale per output row
    with pytest.raises(ValueError, match="2049 columns wide cannot be quantized to int4"):
        int4.group_for(2049)


def test_parse_and_round_trip():
    assert parse_quantization(None) is None
    assert parse_quantization("int8") == QuantizationConfig("int8")
    stored = QuantizationConfig("int4", 64).to_dict()
    assert stored == {"quant_method": "deepseek_vl2", "scheme": "int4", "group_size": 64, "lm_head": False}
    assert parse_quantization(stored) == QuantizationConfig("int4", 64)
    with_head = QuantizationConfig("int4", lm_head=True)
    assert parse_quantization(with_head.to_dict()) == with_head and with_head.to_dict()["lm_head"] is True
    # checkpoints saved before the lm_head key existed keep their head in the activation dtype
    assert parse_quantization({"quant_method": "deepseek_vl2", "scheme": "int8", "group_size": 128}).lm_head is False


@pytest.mark.parametrize("value,message", [
    ("int3", "scheme 'int3' is not supported"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"scheme": "int4", "bits": 4}, "expected keys scheme, group_size and lm_head"),
    ({"scheme": "int4", "lm_head": "yes"}, "lm_head must be true or false, not 'yes'"),
    (4, "must be None, 'int8', 'int4'"),
])
def test_bad_values_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization(value)
    with pytest.raises(ValueError, match="power of two"):
        QuantizationConfig("int4", 96)
