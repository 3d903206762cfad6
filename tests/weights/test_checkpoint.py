"""Strict checkpoint loading: the real releases' layouts, every tensor accounted for, clear errors."""
import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import deepseek_vl2  # noqa: F401
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.weights.hub import CheckpointError
from deepseek_vl2.weights.layout import official_shapes
from deepseek_vl2.weights.random_init import init_random_weights
from goldens import CHECKPOINTS, FIXTURES


@pytest.mark.parametrize("variant,count,params", [("tiny", 2582, 3_370_501_440), ("small", 5639, 16_258_449_984),
                                                   ("base", 6973, 27_480_134_248)])
def test_real_release_layout(variant, count, params):
    """Built from the release's config.json on the meta device, the model maps onto exactly the
    official state_dict names and shapes, so the hub checkpoints load strictly."""
    folder = FIXTURES / "real_shapes" / variant
    layout = json.loads((folder / "state_dict_layout.json").read_text())
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(str(folder)))
    shapes = official_shapes(model)
    expected = {k: tuple(v) for k, v in layout["state_dict"].items()}
    assert len(shapes) == count == layout["n_tensors"]
    assert sorted(set(expected) - set(shapes)) == [] and sorted(set(shapes) - set(expected)) == []
    assert {k: v for k, v in shapes.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == params == layout["n_params"]


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_loads_with_requested_dtype(name):
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(str(CHECKPOINTS[name]), trust_remote_code=True, torch_dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert not model.training
    default = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[name]))
    assert default.dtype == torch.bfloat16  # "auto": the checkpoint's dtype


def test_the_auto_class_loads_without_a_warning_and_a_subfolder_is_refused(caplog):
    """transformers' Auto classes pass subfolder="" (none): no "ignores these arguments" warning for
    it; a real subfolder is refused by name rather than ignored."""
    path = str(CHECKPOINTS["tiny_mha"])
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    assert "ignores these arguments" not in caplog.text
    with pytest.raises(ValueError, match=r"subfolder='weights' is not supported"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, subfolder="weights")


def test_save_pretrained_round_trip(tmp_path):
    source = CHECKPOINTS["base_noaux"]
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size=600_000)
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(written) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    original = {}
    for f in source.glob("*.safetensors"):
        original.update(load_file(str(f)))
    saved = {}
    for f in tmp_path.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reloaded.parameters()))


def test_save_and_load_leave_the_deprecated_dtype_alias_alone(tmp_path, monkeypatch):
    """transformers 5 logs a deprecation warning whenever a config's `torch_dtype` is read or set."""
    from transformers import PretrainedConfig

    if not isinstance(getattr(PretrainedConfig, "torch_dtype", None), property):
        pytest.skip("transformers before 5: torch_dtype is the config's own attribute")
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS["tiny_mha"]), dtype=torch.float32)

    def refuse(*_):
        raise AssertionError("the deprecated torch_dtype alias was used")

    monkeypatch.setattr(PretrainedConfig, "torch_dtype", property(refuse, refuse))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert DeepseekVLV2ForCausalLM.from_pretrained(str(tmp_path)).dtype == torch.float32  # "auto" reads it back


@pytest.fixture
def broken_copy(tmp_path):
    """A writable copy of the single-file tiny checkpoint and its tensors."""
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS["tiny_mha"], target)
    return target, load_file(str(target / "model.safetensors"))


def _load(path):
    return DeepseekVLV2ForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_missing_tensor_is_named(broken_copy):
    path, tensors = broken_copy
    del tensors["language.model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors: language\.model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        _load(path)


def test_unexpected_tensor_is_named(broken_copy):
    path, tensors = broken_copy
    tensors["language.model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors: language\.model\.layers\.0\.extra\.weight"):
        _load(path)


@pytest.mark.parametrize("change, problem", [
    (lambda tensor: tensor[:-1].clone(), "wrong shape: {key}: checkpoint [63, 64], model [64, 64]"),
    (lambda tensor: tensor.to(torch.int32), "1 tensors with the wrong dtype: {key}: checkpoint int32, expected a "
                                            "floating dtype"),
], ids=["misshaped", "floating-weight-as-integers"])
def test_tensor_that_does_not_fit_its_parameter_is_named(broken_copy, change, problem):
    path, tensors = broken_copy
    key = "language.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(problem.format(key=key))):
        _load(path)


def test_truncated_shard(broken_copy):
    path, _ = broken_copy
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint shard .*model\.safetensors"):
        _load(path)


def test_shard_missing_from_index(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS["base_noaux"], target)
    (target / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists shards that are missing .*model-00002-of-00003"):
        _load(target)


def _split_into_shards(path, tensors, first: dict, second: dict):
    """Replace the checkpoint's one weight file by shards holding `first` and `second`, and an index
    that names the second shard for the keys only it holds."""
    (path / "model.safetensors").unlink()
    save_file(first, str(path / "a.safetensors"))
    save_file(second, str(path / "b.safetensors"))
    weight_map = {key: "b.safetensors" if key in second and key not in first else "a.safetensors" for key in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_tensor_in_two_shards_is_named(broken_copy):
    path, tensors = broken_copy
    moved, doubled = "language.lm_head.weight", "language.model.layers.0.self_attn.q_proj.weight"
    first = {key: tensor for key, tensor in tensors.items() if key != moved}
    _split_into_shards(path, tensors, first, {moved: tensors[moved], doubled: torch.zeros_like(tensors[doubled])})
    with pytest.raises(CheckpointError, match=r"1 duplicated tensors: " + re.escape(doubled)):
        _load(path)


def test_index_naming_a_file_outside_the_checkpoint_is_refused(broken_copy, tmp_path):
    path, tensors = broken_copy
    (tmp_path / "other").mkdir()
    (path / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    weight_map = {key: "../other/model.safetensors" for key in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json is not a valid safetensors index: weight_map\[.*\] is "
                                              r"'\.\./other/model\.safetensors', not a file name in "):
        _load(path)


@pytest.mark.parametrize("index, problem", [
    ([], "it must be a JSON object whose weight_map is an object"),
    ({"weight_map": ["model.safetensors"]}, "it must be a JSON object whose weight_map is an object"),
    ({"weight_map": {"image_newline": 3}}, r"weight_map\['image_newline'\] is 3, not a shard file name"),
    ({"weight_map": {"image_newline": ".."}}, r"weight_map\['image_newline'\] is '\.\.', not a file name in"),
    ({"metadata": {}}, "it must be a JSON object whose weight_map is an object"),
], ids=["a-list", "weight-map-a-list", "shard-not-a-string", "shard-the-parent", "no-weight-map"])
def test_malformed_index_is_named(broken_copy, index, problem):
    path, _ = broken_copy
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid safetensors index: "
                                              + problem):
        _load(path)


def test_stored_float_dtypes_are_cast(broken_copy):
    """The releases are bfloat16; a float32 or float16 tensor loads as well, cast to the model's dtype."""
    path, tensors = broken_copy
    key = "language.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.float16)
    save_file(tensors, str(path / "model.safetensors"))
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_no_config_json_is_named(broken_copy):
    path, _ = broken_copy
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"^no config\.json in .*ckpt$"):
        _load(path)


def test_no_weights_and_bad_paths(tmp_path):
    shutil.copy(CHECKPOINTS["tiny_mha"] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        _load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file"):
        _load(tmp_path / "config.json")


def test_dtype_and_device_errors():
    path = str(CHECKPOINTS["tiny_mha"])
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, dtype="float8")
    with pytest.raises(ValueError, match="not supported"):
        DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DeepseekVLV2ForCausalLM.from_pretrained(path, device_map="cuda")
        assert DeepseekVLV2ForCausalLM.from_pretrained(path, device_map="auto").device.type == "cpu"


def test_device_map_dict_places_modules():
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS["tiny_mha"]), dtype=torch.float32,
                                                    device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _saved(folder, name, shard_size=None):
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[name]), dtype=torch.float32)
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    return model


def _assert_reloads_to(model, folder):
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert reloaded.config.language_config.to_dict() == model.config.language_config.to_dict()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("old,new", [(("base_noaux", 600_000), ("tiny_mha", None)),
                                     (("tiny_mha", None), ("base_noaux", 600_000))],
                         ids=["sharded-then-one-file", "one-file-then-sharded"])
def test_save_over_an_older_checkpoint_replaces_its_weight_files(tmp_path, old, new):
    (tmp_path / "notes.txt").write_text("not a checkpoint file: stays")
    _saved(tmp_path, *old)
    model = _saved(tmp_path, *new)
    files = {p.name for p in tmp_path.iterdir()}
    if new[1]:  # sharded: exactly the shards its index lists
        listed = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(listed) > 1 and files == {"notes.txt", "config.json", "model.safetensors.index.json"} | listed
    else:
        assert files == {"notes.txt", "config.json", "model.safetensors"}
    _assert_reloads_to(model, tmp_path)


def test_save_into_the_directory_the_model_came_from(tmp_path):
    """Weights are copied out of the files at load, so the files can be replaced; a symlinked file
    (a hub cache snapshot) is replaced, not written through into its target."""
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS["tiny_mha"], target)
    blob = tmp_path / "blob"
    (target / "model.safetensors").rename(blob)
    (target / "model.safetensors").symlink_to(blob)
    original = blob.read_bytes()
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    init_random_weights(model, seed=3)
    model.save_pretrained(target, max_shard_size=600_000)
    assert blob.read_bytes() == original and not (target / "model.safetensors").exists()
    assert (target / "tokenizer.json").is_file() and (target / "processor_config.json").is_file()
    _assert_reloads_to(model, target)
    init_random_weights(model, seed=4)
    model.save_pretrained(target)  # and back to one file, from the sharded one it was just saved as
    assert sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]
    _assert_reloads_to(model, target)
