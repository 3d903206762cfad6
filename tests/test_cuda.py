"""GPU checks (skipped without CUDA): bf16 CUDA logits against the official fp32 goldens, the fast
decode path (static cache, CUDA graphs, compiled regions) against the plain path, and a
random-weight model at the real `small` shapes on a 1024x1024 image."""
import pytest
import torch

from goldens import CASES, FIXTURES, SINGLE_CASES, fixture_model, golden_inputs, tensors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_LOGITS_REL = 3e-2  # bf16 noise after a few layers of random tiny weights (measured: see RESULTS.md)


def cuda_model(checkpoint):
    return fixture_model(checkpoint, torch.bfloat16).to("cuda")


def first_divergence(a, b):
    diff = (a != b).nonzero()
    return None if not len(diff) else diff[0, -1].item()


def greedy(lm, embeds, mask, n, graphs):
    """Greedy tokens and per-step scores (graphs: the fast path's host loop, which returns scores;
    its sequences are also checked against the in-graph greedy loop, which does not)."""
    lm.cuda_graphs = graphs
    try:
        kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out = lm.generate(**kw, return_dict_in_generate=True, output_scores=True)
        if graphs:
            assert torch.equal(lm.generate(**kw), out.sequences), "in-graph greedy differs from the host loop"
        return out
    finally:
        lm.cuda_graphs = True


def _finite_difference(a, b) -> float:
    """Largest |a - b| over entries finite in both (suppressed tokens are -inf in both)."""
    a, b = a.float(), b.float()
    both = torch.isfinite(a) & torch.isfinite(b)
    return (a[both] - b[both]).abs().max().item()


def assert_same_or_near_tie(fast, plain):
    """Fast-path tokens equal the plain path's, or first differ at a near-tie: a step whose plain-path
    top-2 margin is within twice the numerical noise between the two paths, measured as the largest
    logit difference over the steps before (same tokens so far, so any difference is rounding)."""
    for row in range(plain.sequences.shape[0]):
        i = first_divergence(fast.sequences[row], plain.sequences[row])
        if i is None:
            continue
        noise = max(_finite_difference(fast.scores[s][row], plain.scores[s][row]) for s in range(i + 1))
        top = plain.scores[i][row].float().topk(2).values
        margin = (top[0] - top[1]).item()
        print(f"row {row}: first difference at step {i}, plain margin {margin:.3f}, path noise {noise:.3f}")
        assert margin <= 2 * noise, f"row {row} differs at step {i}: margin {margin:.4f} > 2 x noise {noise:.4f}"


@pytest.mark.parametrize("name", SINGLE_CASES)
def test_bf16_cuda_logits_match_fp32_goldens(name):
    model = cuda_model(CASES[name]["checkpoint"])
    t = tensors(name)
    inputs = {k: v.cuda() for k, v in golden_inputs(name).items()}
    with torch.no_grad():
        logits = model(attention_mask=t["attention_mask"].bool().cuda(), use_cache=False, **inputs).logits[0]
    gold = t["logits_last"]
    got = logits[t["logits_last_positions"].cuda()].double().cpu()
    rel = ((got - gold).abs().max() / gold.abs().max()).item()
    print(f"{name}: bf16 CUDA vs fp32 official logits rel err {rel:.2e}")
    assert rel <= BF16_LOGITS_REL, f"bf16 CUDA vs fp32 official logits: rel err {rel:.3e}"


@pytest.mark.parametrize("name", SINGLE_CASES)
def test_fast_path_matches_plain_path_on_fixtures(name):
    model = cuda_model(CASES[name]["checkpoint"])
    t = tensors(name)
    inputs = {k: v.cuda() for k, v in golden_inputs(name).items()}
    mask = t["attention_mask"].bool().cuda()
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
    fast = greedy(model.language, embeds, mask, 64, graphs=True)
    plain = greedy(model.language, embeds, mask, 64, graphs=False)
    assert fast.sequences.shape == plain.sequences.shape == (1, 64)
    assert_same_or_near_tie(fast, plain)


def test_fast_path_left_padded_batch_rows_match_single_rows():
    model = cuda_model("small_mla")
    t = tensors("p09_batch_left_pad")
    ids, mask = t["batch_input_ids"].cuda(), t["batch_attention_mask"].bool().cuda()
    with torch.no_grad():
        embeds = model.language.get_input_embeddings()(ids)  # text-only view of the batch is enough here
    batch = greedy(model.language, embeds, mask, 32, graphs=True)
    for row in range(ids.shape[0]):
        keep = mask[row]
        single = greedy(model.language, embeds[row : row + 1, keep], mask[row : row + 1, keep], 32, graphs=True)
        row_out = type(batch)(sequences=batch.sequences[row : row + 1],
                              scores=tuple(s[row : row + 1] for s in batch.scores))
        assert_same_or_near_tie(row_out, single)


@pytest.fixture(scope="module")
def real_small():
    """deepseek-vl2-small's real shapes with random bf16 weights, built directly on the GPU."""
    from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
    from deepseek_vl2.models.random_init import init_random_weights

    config = DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / "small"))
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    init_random_weights(model, seed=0)
    yield model.eval()
    del model
    torch.cuda.empty_cache()


def test_real_small_shapes_on_a_1024_image(real_small, tmp_path):
    from PIL import Image

    from deepseek_vl2.offline_checkpoint import make_offline_checkpoint
    from deepseek_vl2.models import DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(tmp_path / "ckpt")))
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    conversation = [{"role": "<|User|>", "content": "<image>\nDescribe the picture in detail, please."},
                    {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=conversation, images=[image], force_batchify=True).to("cuda")
    assert batch.images.shape[1] == 10  # 1 global + 3x3 local tiles
    with torch.no_grad():
        embeds = real_small.prepare_inputs_embeds(**batch)
        logits = real_small(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False,
                            logits_to_keep=1).logits
    assert embeds.shape == (1, batch.input_ids.shape[1], 2048)
    assert logits.shape == (1, 1, 129280) and torch.isfinite(logits).all()
    fast = greedy(real_small.language, embeds, batch.attention_mask, 64, graphs=True)
    plain = greedy(real_small.language, embeds, batch.attention_mask, 64, graphs=False)
    assert_same_or_near_tie(fast, plain)


# ---- a model spread over two GPUs (device_map) ----------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def load_placed(checkpoint, dtype, **kw):
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM

    return DeepseekVLV2ForCausalLM.from_pretrained(str(FIXTURES / f"ckpt_{checkpoint}"), dtype=dtype, progress=False,
                                                   **kw)


def layer_split_map(model):
    """Vision, embeddings and the first half of the layers on GPU 0; the rest, norm and head on GPU 1."""
    n = len(model.language.model.layers)
    return {"": 0, **{f"language.model.layers.{i}": 1 for i in range(n // 2, n)}, "language.model.norm": 1,
            "language.lm_head": 1}


def placement_report(model):
    from deepseek_vl2.models.loading import describe_placement

    return {device: (round(e["gib"] * 2**30), e["modules"]) for device, e in describe_placement(model).items()}


def assert_units_whole(model):
    for i, layer in enumerate(model.language.model.layers):
        devices = {p.device for p in layer.parameters()}
        assert len(devices) == 1, f"decoder layer {i} is split over {devices}: {placement_report(model)}"
    assert len({p.device for p in model.vision.parameters()}) == 1, f"vision tower split: {placement_report(model)}"


def run_case(model, name, n, graphs=False):
    """fp32 logits of a whole-prompt forward and greedy generate (tokens and per-step scores) of an
    image case, inputs on the model's (first) device."""
    t = tensors(name)
    inputs = {k: v.to(model.device) for k, v in golden_inputs(name).items()}
    mask = t["attention_mask"].bool().to(model.device)
    model.language.cuda_graphs = graphs
    try:
        with torch.no_grad():
            logits = model(attention_mask=mask, use_cache=False, **inputs).logits.float()
        out = model.generate(**inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
    finally:
        model.language.cuda_graphs = True
    return logits, out


def case_of(checkpoint):
    return next(n for n in SINGLE_CASES if CASES[n]["checkpoint"] == checkpoint)


def compare_split(split, single, checkpoint, n=32, exact=True):
    name = case_of(checkpoint)
    print(f"{checkpoint}: placement {placement_report(split)}")
    assert_units_whole(split)
    assert split.language.is_split and {p.device.index for p in split.parameters()} == {0, 1}
    logits, out = run_case(split, name, n)
    ref_logits, ref_out = run_case(single, name, n)
    assert logits.device == ref_logits.device == torch.device("cuda:0")
    diff = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"{checkpoint}: split vs one GPU logits rel diff {diff:.2e}; tokens {out.sequences[0, -n:].tolist()}")
    # the same kernels run on either GPU, so both should be (nearly) bit-identical; tokens must be
    # equal, or differ first at a recorded near-tie of the one-GPU run
    assert diff <= (1e-5 if exact else BF16_LOGITS_REL), f"split logits differ from one GPU's: rel {diff:.3e}"
    assert_same_or_near_tie(out, ref_out)


@two_gpus
@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_two_gpu_dict_split_matches_one_gpu_fp32(checkpoint):
    single = load_placed(checkpoint, torch.float32, device_map="cuda:0")
    split = load_placed(checkpoint, torch.float32, device_map=layer_split_map(single))
    n = len(split.language.model.layers)
    assert [layer.input_layernorm.weight.device.index for layer in split.language.model.layers] == \
        [0] * (n // 2) + [1] * (n - n // 2)
    compare_split(split, single, checkpoint)


@two_gpus
@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_two_gpu_dict_split_matches_one_gpu_bf16(checkpoint):
    """bf16 takes the Triton decode kernels (gemv, router, decode attention) on GPU 1 too."""
    single = load_placed(checkpoint, torch.bfloat16, device_map="cuda:0")
    split = load_placed(checkpoint, torch.bfloat16, device_map=layer_split_map(single))
    compare_split(split, single, checkpoint, exact=False)


@two_gpus
@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_auto_with_small_max_memory_splits_and_matches_one_gpu(checkpoint):
    single = load_placed(checkpoint, torch.float32, device_map="cuda:0")
    total = sum(p.numel() * p.element_size() for p in single.parameters())
    budgets = {0: int(0.6 * total), 1: total}  # GPU 0 cannot hold it all: "auto" balances
    split = load_placed(checkpoint, torch.float32, device_map="auto", max_memory=budgets)
    print(f"{checkpoint}: hf_device_map {split.hf_device_map}")
    for device, (size, _) in placement_report(split).items():
        assert size <= budgets[torch.device(device).index], f"{device} holds {size} bytes, over its budget"
    compare_split(split, single, checkpoint)


@two_gpus
def test_model_on_the_second_gpu_uses_the_fast_path_there():
    """device_map="cuda:1" (cuda:0 current): graphs, compiled regions and Triton kernels on GPU 1."""
    model = load_placed("small_mla", torch.bfloat16, device_map="cuda:1")
    assert torch.cuda.current_device() == 0 and model.device == torch.device("cuda:1")
    assert not model.language.is_split
    name = case_of("small_mla")
    _, fast = run_case(model, name, 32, graphs=True)
    _, plain = run_case(model, name, 32, graphs=False)
    assert model.language.__dict__.get("_static_decoders"), "the fast path was not taken"
    assert_same_or_near_tie(fast, plain)


@pytest.mark.parametrize("checkpoint", ["small_mla", "tiny_mha"])
def test_gpu_and_cpu_split_matches_one_gpu(checkpoint):
    """Units placed on "cpu" run on the CPU (no offload hooks): the last layer, norm and head there."""
    single = load_placed(checkpoint, torch.float32, device_map="cuda:0")
    n = len(single.language.model.layers)
    split = load_placed(checkpoint, torch.float32, device_map={"": 0, f"language.model.layers.{n - 1}": "cpu",
                                                               "language.model.norm": "cpu", "language.lm_head": "cpu"})
    print(f"{checkpoint}: placement {placement_report(split)}")
    assert split.language.is_split and split.language.lm_head.weight.device.type == "cpu"
    name = case_of(checkpoint)
    logits, out = run_case(split, name, 16)
    ref_logits, ref_out = run_case(single, name, 16)
    diff = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"{checkpoint}: GPU+CPU vs one GPU logits rel diff {diff:.2e}")
    assert logits.device == torch.device("cuda:0") and diff <= 1e-4
    assert_same_or_near_tie(out, ref_out)
