"""Configs round-trip the released config.json files; importing the package registers the Auto classes."""
import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import deepseek_vl2  # noqa: F401  (registration)
from deepseek_vl2.models import DeepseekV2Config, DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.weights.hub import CheckpointError
from goldens import CHECKPOINTS, FIXTURES

RELEASES = [FIXTURES / "real_shapes" / v for v in ("tiny", "small", "base")] + list(CHECKPOINTS.values())


def assert_subset(original: dict, written: dict, path=""):
    for key, value in original.items():
        if key == "transformers_version":  # rewritten by whichever transformers saves
            continue
        if key == "torch_dtype":  # transformers 5 writes it as "dtype"
            assert str(written.get("torch_dtype", written.get("dtype"))).endswith(value), path + key
        elif isinstance(value, dict):
            assert_subset(value, written[key], f"{path}{key}.")
        else:
            got = written[key]
            if isinstance(value, list):
                got = [list(v) if isinstance(v, (list, tuple)) else v for v in got]
            assert got == value, f"{path}{key}: {got!r} != {value!r}"


@pytest.mark.parametrize("folder", RELEASES, ids=lambda p: p.name)
def test_config_json_round_trips(folder, tmp_path):
    original = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(folder))
    assert isinstance(config, DeepseekVLV2Config) and isinstance(config.language_config, DeepseekV2Config)
    assert_subset(original, config.to_dict())
    config.save_pretrained(str(tmp_path))
    again = DeepseekVLV2Config.from_pretrained(str(tmp_path))
    assert_subset(original, again.to_dict())
    assert again.language_config.rope_scaling == original["language_config"].get("rope_scaling")


def test_release_values():
    small = DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / "small"))
    lang = small.language_config
    assert (lang.hidden_size, lang.num_hidden_layers, lang.n_routed_experts, lang.kv_lora_rank) == (2048, 27, 64, 512)
    assert lang.use_mla and lang.q_lora_rank is None and lang.topk_method == "greedy"
    assert small.vision_config.width == 1152 and small.vision_config.layers == 27
    assert len(small.candidate_resolutions) == 23 and small.tile_tag == "2D"
    assert [lang.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_registration():
    for model_type in ("deepseek_vl_v2", "vision", "mlp_projector"):
        assert model_type in CONFIG_MAPPING
    if "deepseek_v2" in CONFIG_MAPPING:  # transformers >= 4.5x has its own: left alone
        assert CONFIG_MAPPING["deepseek_v2"].__module__.startswith("transformers.")
    assert AutoModelForCausalLM._model_mapping[DeepseekVLV2Config] is DeepseekVLV2ForCausalLM


def test_unsupported_settings_are_named():
    with pytest.raises(ValueError, match="topk_method='gready' is not supported"):
        DeepseekV2Config(n_routed_experts=4, num_experts_per_tok=2).validate_for_model()
    with pytest.raises(ValueError, match="rope_scaling type 'ntk' is not supported"):
        DeepseekV2Config(rope_scaling={"type": "ntk", "factor": 2}).validate_for_model()
    config = DeepseekVLV2Config.from_pretrained(str(CHECKPOINTS["tiny_mha"]))
    config.tile_tag = "1D"
    with pytest.raises(ValueError, match="tile_tag '1D' is not supported"):
        DeepseekVLV2ForCausalLM(config)


def test_experts_per_token_must_fit_the_experts():
    for chosen in (9, 0, -1):
        config = DeepseekV2Config(n_routed_experts=8, num_experts_per_tok=chosen, topk_method="greedy")
        message = rf"num_experts_per_tok={chosen} must be between 1 and language_config\.n_routed_experts=8"
        with pytest.raises(ValueError, match=message):
            config.validate_for_model()


def _set(section, key, value):
    def edit(config):
        (config[section] if section else config)[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("language_config", "vocab_size", "2048"), r"language_config\.vocab_size must be an integer, not '2048'"),
    (_set("language_config", "num_hidden_layers", 3.5), r"language_config\.num_hidden_layers must be an integer, "
                                                         r"not 3\.5"),
    (_set("language_config", "hidden_size", True), r"language_config\.hidden_size must be an integer, not True"),
    (_set("language_config", "num_experts_per_tok", 9), r"language_config\.num_experts_per_tok=9 must be between 1 "
                                                         r"and language_config\.n_routed_experts=8"),
    (_set("vision_config", "width", "64"), r"vision_config\.width must be an integer, not '64'"),
    (_set("projector_config", "n_embed", None), r"projector_config\.n_embed must be an integer, not None"),
    (_set(None, "language_config", [1]), r"language_config must be a JSON object, not list \[1\]"),
    (_set(None, "torch_dtype", "float8"), r"torch_dtype='float8' is not a torch dtype"),
    (_set("language_config", "torch_dtype", 16), r"language_config\.torch_dtype=16 is not a torch dtype"),
    (lambda config: config.pop("language_config"), r"no language_config section"),
    (lambda config: config.pop("vision_config"), r"no vision_config section"),
    (lambda config: config.pop("projector_config"), r"no projector_config section"),
], ids=["vocab-a-string", "layers-a-float", "hidden-a-bool", "too-many-experts-per-token", "vision-width-a-string",
        "projector-width-null", "language-a-list", "dtype-float8", "section-dtype-a-number", "no-language",
        "no-vision", "no-projector"])
def test_bad_config_json_values_are_named(tmp_path, edit, message):
    config = json.loads((CHECKPOINTS["tiny_mha"] / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(CHECKPOINTS["tiny_mha"] / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ": " + message):
        DeepseekVLV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "deepseek_vl_v2", "language_config": {"hidden_size": 6', r"is not valid JSON: "),
    ("\xff\xfe garbage", r"is not valid JSON: "),
    ("[1, 2]", r"must hold a JSON object, not a list"),
], ids=["truncated", "not-text", "a-list"])
def test_unreadable_config_json_is_named(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + " " + message):
        DeepseekVLV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
