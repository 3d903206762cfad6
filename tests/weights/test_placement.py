"""device_map / max_memory: the placement planning (checked without GPUs through an explicit GPU
count), its errors, CPU placement end to end, and the split code path run on one device. The
2-GPU runs are in test_cuda.py."""
import pytest
import torch

from deepseek_vl2.modeling.devices import Split
from deepseek_vl2.modeling.kv_cache import KVCache
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.weights.placement import describe_placement, placement_units, resolve_device_map
from goldens import CASES, CHECKPOINTS, FIXTURES, golden_inputs, tensors

GiB = 2**30


def meta_model(config_dir, dtype=torch.bfloat16):
    config = DeepseekVLV2Config.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config)
    return model.to(dtype)


@pytest.fixture(scope="module")
def real_small():
    return meta_model(FIXTURES / "real_shapes" / "small")


@pytest.fixture(scope="module")
def fixture_meta():
    return meta_model(CHECKPOINTS["small_mla"], torch.float32)


def unit_bytes(model):
    params = dict(model.named_parameters())
    return {unit: sum(params[n].numel() * params[n].element_size() for n in names)
            for unit, names in placement_units(model).items()}


def check_plan(model, placement, budgets):
    """Every parameter in exactly one unit, every decoder layer and the vision tower a unit, the
    image path on one device, each device within its budget; returns GiB per device."""
    units = placement_units(model)
    covered = [n for names in units.values() for n in names]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())
    layers = len(model.language.model.layers)
    assert all(f"language.model.layers.{i}" in placement for i in range(layers)), "a decoder layer was split"
    assert "vision" in placement, "the vision tower was split"
    assert placement["projector"] == placement["image_newline"] == placement["view_seperator"] == placement["vision"]
    used = {}
    for unit, size in unit_bytes(model).items():
        used[placement[unit]] = used.get(placement[unit], 0) + size
    for device, size in used.items():
        key = "cpu" if device.type == "cpu" else device.index
        assert size <= budgets[key], f"{device}: {size / GiB:.2f} GiB over its budget {budgets[key] / GiB:.2f} GiB"
    return {str(d): round(s / GiB, 2) for d, s in used.items()}


@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
def test_real_small_plan_uses_both_gpus_within_18_gib(real_small, strategy):
    """The issue's case: small (30.3 GiB in bf16) with max_memory 18 GiB per GPU on two GPUs."""
    placement = resolve_device_map(strategy, real_small, torch.bfloat16, {0: "18GiB", 1: "18GiB"}, gpu_count=2)
    assert isinstance(placement, dict), f"{strategy}: everything on {placement}"
    used = check_plan(real_small, placement, {0: 18 * GiB, 1: 18 * GiB})
    print(strategy, used)
    assert set(used) == {"cuda:0", "cuda:1"}
    assert placement["language.model.embed_tokens"] == placement["language.model.layers.0"] == torch.device("cuda:0")
    layer_devices = [placement[f"language.model.layers.{i}"].index for i in range(27)]
    assert layer_devices == sorted(layer_devices), "layers are not in order over the GPUs"
    if strategy != "sequential":  # balanced: neither GPU carries much more than half
        assert max(used.values()) < 0.6 * sum(used.values())


def test_real_small_plan_offloads_to_cpu_when_allowed(real_small):
    budgets = {0: 10 * GiB, 1: 10 * GiB, "cpu": 100 * GiB}
    placement = resolve_device_map("auto", real_small, torch.bfloat16, dict(budgets), gpu_count=2)
    used = check_plan(real_small, placement, budgets)
    assert set(used) == {"cuda:0", "cuda:1", "cpu"}
    assert placement["language.lm_head"] == torch.device("cpu")


def test_auto_keeps_one_gpu_when_the_model_fits_its_budget(real_small):
    assert resolve_device_map("auto", real_small, torch.bfloat16, {0: "40GiB", 1: "40GiB"},
                              gpu_count=2) == torch.device("cuda:0")
    assert resolve_device_map("auto", real_small, torch.bfloat16, {1: "40GiB"}, gpu_count=2) == torch.device("cuda:1")
    placement = resolve_device_map("balanced", real_small, torch.bfloat16, {0: "40GiB", 1: "40GiB"}, gpu_count=2)
    assert set(placement.values()) == {torch.device("cuda:0"), torch.device("cuda:1")}


def test_plan_that_does_not_fit_is_refused(real_small):
    with pytest.raises(ValueError, match=r"does not fit.*disk"):
        resolve_device_map("auto", real_small, torch.bfloat16, {0: "10GiB", 1: "10GiB"}, gpu_count=2)


@pytest.mark.parametrize("device_map, max_memory, match", [
    ({"language.model.layerz": 0}, None, r"names 'language.model.layerz', which is not a module"),
    ({"vision": "cpu"}, None, r"leaves \d+ parameter\(s\) unplaced, e.g. \['image_newline'"),
    ({"": 2}, None, r"asks for cuda:2, but only 2 GPU\(s\) are visible"),
    ({"": "cuda:7"}, None, r"asks for cuda:7"),
    ({"": 0, "language.model.layers.1.mlp": 1}, None, r"splits language.model.layers.1 \(DecoderLayer\)"),
    ({"": 0, "vision.blocks.0": 1}, None, r"splits vision \(VisionTransformer\)"),
    ({"": 0, "projector.layers.0": 1}, None, r"splits projector \(MlpProjector\)"),
    ({"": "disk"}, None, r"disk.*not supported"),
    ({"": "tpu"}, None, r"not understood"),
    ("balance", None, r"'balance' is not understood"),
    ("auto", {"gpu0": "1GiB"}, r"max_memory key 'gpu0'"),
    ("auto", {0: "1GiB", 5: "1GiB"}, r"max_memory key 5 asks for cuda:5, but only 2 GPU"),
    ("auto", {0: "lots"}, r"max_memory\[0\] = 'lots' is not a size"),
    ("auto", {0: "1GiB", "disk": "1TiB"}, r"disk.*not supported"),
    ("auto", {}, r"non-empty dict"),
])
def test_bad_device_maps_are_refused(fixture_meta, device_map, max_memory, match):
    with pytest.raises(ValueError, match=match):
        resolve_device_map(device_map, fixture_meta, torch.float32, max_memory, gpu_count=2)


def test_gpu_device_map_without_cuda_is_refused(fixture_meta):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device_map({"": 0}, fixture_meta, torch.float32, gpu_count=0)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device_map("auto", fixture_meta, torch.float32, {0: "1GiB"}, gpu_count=0)
    assert resolve_device_map("auto", fixture_meta, torch.float32, gpu_count=0) == torch.device("cpu")
    assert resolve_device_map("auto", fixture_meta, torch.float32, {"cpu": "1GiB"}, gpu_count=0) == torch.device("cpu")


def fixture_split_budgets(model):
    """max_memory that makes "auto" split the fixture model over two GPUs (used by test_cuda.py)."""
    total = sum(unit_bytes(model).values())
    return {0: int(0.6 * total), 1: total}


@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_fixture_budgets_force_a_split(checkpoint):
    """The budgets test_cuda.py gives "auto" for the fixtures (60% of the model on GPU 0) split them."""
    model = meta_model(CHECKPOINTS[checkpoint], torch.float32)
    budgets = fixture_split_budgets(model)
    placement = resolve_device_map("auto", model, torch.float32, dict(budgets), gpu_count=2)
    assert isinstance(placement, dict)
    check_plan(model, placement, budgets)
    assert {d.index for d in placement.values()} == {0, 1}


def load(checkpoint, **kw):
    return DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[checkpoint]), dtype=torch.float32, progress=False,
                                                   **kw)


def first_case(checkpoint):
    return next(n for n, c in CASES.items() if c["checkpoint"] == checkpoint and c["kind"] == "single")


def run(model, name, n=12):
    inputs = golden_inputs(name)
    mask = tensors(name)["attention_mask"].bool()
    with torch.no_grad():
        logits = model(attention_mask=mask, use_cache=False, **inputs).logits
    out = model.generate(**inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    return logits, out


def test_cpu_dict_device_map_end_to_end():
    checkpoint = "small_mla"
    units = placement_units(meta_model(CHECKPOINTS[checkpoint], torch.float32))
    model = load(checkpoint, device_map={unit: "cpu" for unit in units})
    assert model.hf_device_map == {"": "cpu"} and not model.language.is_split
    reference = load(checkpoint)
    name = first_case(checkpoint)
    (logits, out), (ref_logits, ref_out) = run(model, name), run(reference, name)
    assert torch.equal(logits, ref_logits) and torch.equal(out.sequences, ref_out.sequences)
    assert describe_placement(model).keys() == {"cpu"}


def force_split(model, cut):
    """The split code path on one device (the CPU): layers [0, cut) and [cut, n) as two segments."""
    cpu, n = torch.device("cpu"), len(model.language.model.layers)
    model.language.model.split = Split(layers=[cpu] * n, norm=cpu, head=cpu, segments=[(cpu, 0, cut), (cpu, cut, n)])


@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_split_code_path_gives_the_same_logits_and_tokens(checkpoint):
    model, reference = load(checkpoint), load(checkpoint)
    force_split(model, cut=2)
    assert model.language.is_split
    name = first_case(checkpoint)
    (logits, out), (ref_logits, ref_out) = run(model, name), run(reference, name)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref_out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref_out.scores))
    inputs = golden_inputs(name)
    _, past = model.incremental_prefilling(attention_mask=tensors(name)["attention_mask"].bool(), chunk_size=100,
                                           **inputs)
    _, ref_past = reference.incremental_prefilling(attention_mask=tensors(name)["attention_mask"].bool(),
                                                   chunk_size=100, **inputs)
    assert all(torch.equal(a, b) for la, lb in zip(past, ref_past) for a, b in zip(la, lb))
    model.to(torch.float32)  # any .to() finds the placement again: one device, no split
    assert not model.language.is_split


def test_kv_cache_takes_one_device_per_layer():
    config = DeepseekVLV2Config.from_pretrained(str(CHECKPOINTS["small_mla"])).language_config
    n = config.num_hidden_layers
    cache = KVCache(config, 1, 4, [torch.device("cpu")] * n, torch.float32)
    assert cache.layer_devices == [torch.device("cpu")] * n and cache.device == torch.device("cpu")
    cache.reserve(9)
    assert cache.capacity >= 9
    with pytest.raises(ValueError, match=f"got 2 devices for {n} layers"):
        KVCache(config, 1, 4, ["cpu", "cpu"], torch.float32)
