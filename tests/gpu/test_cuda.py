"""GPU checks (skipped without CUDA): bf16 CUDA logits against the official fp32 goldens, the fast
decode path (static cache, CUDA graphs, compiled regions) against the plain path, and a
random-weight model at the real `small` shapes on a 1024x1024 image, and the fast path's lifetime
(memory given back on `del model`, no stale graph after a move or new weights)."""
import gc
import weakref

import pytest
import torch

from decode_paths import assert_same_or_near_tie, finite_difference, finite_scale, greedy
from goldens import CASES, CHECKPOINTS, FIXTURES, SINGLE_CASES, fixture_model, golden_inputs, tensors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_LOGITS_REL = 3e-2  # bf16 noise after a few layers of random tiny weights (measured: see RESULTS.md)


def cuda_model(checkpoint):
    return fixture_model(checkpoint, torch.bfloat16).to("cuda")


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


@pytest.mark.parametrize("compile_after", [0, 16, 2048], ids=["compiled", "compiled-mid-answer", "plain-graphs"])
@pytest.mark.parametrize("name", SINGLE_CASES)
def test_fast_path_matches_plain_path_on_fixtures(name, compile_after):
    model = cuda_model(CASES[name]["checkpoint"])
    model.language.compile_decode_after = compile_after
    t = tensors(name)
    inputs = {k: v.cuda() for k, v in golden_inputs(name).items()}
    mask = t["attention_mask"].bool().cuda()
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
    # compiled mid-answer, the host loop's first 16 steps ran plain kernels and the in-graph loop's
    # none: the two differ by rounding, so each is checked against the plain path alone
    fast = greedy(model.language, embeds, mask, 64, graphs=True, check_in_graph=compile_after != 16)
    plain = greedy(model.language, embeds, mask, 64, graphs=False)
    assert fast.sequences.shape == plain.sequences.shape == (1, 64)
    assert_same_or_near_tie(fast, plain)


@pytest.mark.parametrize("name", ["p01_single_640x480", "p02_single_1024_square", "p03_tall_300x1200"],
                         ids=["tiny_mha", "small_mla", "base_noaux"])
def test_generate_queues_the_prefill_while_the_tower_runs(name):
    """From the vision tower's first module to the end of the prefill, generate makes no call that
    waits for the GPU (torch's sync debug mode raises on one): the prompt mask is read before the
    tower is queued, and a prefill without padding runs without a mask to read. (Only a model's
    first call copies a table from the host: the RoPE table, built on first use.)"""
    model = cuda_model(CASES[name]["checkpoint"])
    inputs = {k: v.cuda() for k, v in golden_inputs(name).items()}
    mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    plain = model.generate(max_new_tokens=1, do_sample=False, **inputs)  # no mask at all; builds the RoPE table
    seen = []

    def tower_starts(module, args):
        seen.append("tower")
        torch.cuda.set_sync_debug_mode("error")

    def prefill_ends(module, args, output):
        torch.cuda.set_sync_debug_mode(0)
        seen.append("prefill")

    hooks = [model.vision.patch_embed.register_forward_pre_hook(tower_starts),
             model.language.register_forward_hook(prefill_ends)]
    try:
        out = model.generate(attention_mask=mask, max_new_tokens=1, do_sample=False, **inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for hook in hooks:
            hook.remove()
    assert seen == ["tower", "prefill"]
    assert torch.equal(out, plain)


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
    from deepseek_vl2.weights.random_init import init_random_weights

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

    from deepseek_vl2.models import DeepseekVLV2Processor
    from deepseek_vl2.offline_checkpoint import make_offline_checkpoint

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


# ---- lifetime: memory given back at `del model`, decoders remade for moved or replaced weights -------

def fresh_cuda_model(dtype=torch.bfloat16, warm_up=False):
    """A tiny fixture model of its own on the GPU (cuda_model's are cached for the session); no
    warm-up, so the decoders the tests make are made by the tests."""
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM

    return DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS["tiny_mha"]), dtype=dtype, device_map="cuda",
                                                   progress=False, warm_up=warm_up)


def batch_prompt(model):
    t = tensors("p09_batch_left_pad")
    with torch.no_grad():
        embeds = model.language.get_input_embeddings()(t["batch_input_ids"].cuda())
    return embeds, t["batch_attention_mask"].bool().cuda()


def allocated() -> int:
    """Bytes allocated by tensors, less the workspace cuBLAS keeps per stream (process state that
    belongs to no model)."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def load_and_generate():
    """Load a model, decode with batch sizes 1 and 2 (static caches, CUDA graphs of both kinds,
    compiled regions); return a weak reference to it and the bytes allocated while it was there."""
    from deepseek_vl2.generation import cuda_graphs

    model = fresh_cuda_model()
    model.language.compile_decode_after = 0  # compiled regions from the first step
    embeds, mask = batch_prompt(model)
    greedy(model.language, embeds[:1], mask[:1], 16, graphs=True)
    greedy(model.language, embeds, mask, 16, graphs=True)
    decoders = cuda_graphs._DECODERS[model.language][1]
    assert sorted(decoders) == [1, 2] and all(d.graphs and d.codes for d in decoders.values())
    return weakref.ref(model), torch.cuda.memory_allocated()


def test_deleting_a_model_gives_back_all_its_gpu_memory():
    load_and_generate()  # once first, for one-time process state (CUDA-graph RNG state, kernels)
    before = allocated()
    gc.disable()  # no cycle collector: a reference cycle would keep the model, as until a collection
    try:
        model, held = load_and_generate()  # its last reference is gone when this returns
        assert model() is None
        after = allocated()
    finally:
        gc.enable()
    assert held - before > 8 * 2**20  # weights, two static caches, graph pools: what a leak would keep
    assert after - before < 2**20, f"{(after - before) / 2**20:.1f} MiB still allocated after del"


def test_moved_or_reloaded_model_decodes_with_its_current_weights():
    from deepseek_vl2.weights.random_init import init_random_weights

    model = fresh_cuda_model()
    lm = model.language
    embeds, mask = batch_prompt(model)
    first = greedy(lm, embeds, mask, 16, graphs=True)

    def assert_same(out, expected):
        assert torch.equal(out.sequences, expected.sequences)
        assert all(finite_difference(a, b) <= 1e-2 * finite_scale(b) for a, b in zip(out.scores, expected.scores))

    # moved away and back, with junk taking the old weights' addresses: a stale graph would read it
    shapes = [(p.shape, p.dtype) for p in model.parameters()]
    model.cpu()
    junk = [torch.full(shape, 7.0, dtype=dtype, device="cuda") for shape, dtype in shapes]
    model.cuda()
    assert_same(greedy(lm, embeds, mask, 16, graphs=True), first)
    del junk

    # new tensors with other weights (load_state_dict(assign=True)): as a model loaded with them
    other = init_random_weights(fresh_cuda_model(), seed=1)
    expected = greedy(other.language, embeds, mask, 16, graphs=True)
    assert finite_difference(expected.scores[0], first.scores[0]) > 0.1 * finite_scale(first.scores[0])
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    assert_same(greedy(lm, embeds, mask, 16, graphs=True), expected)

    # cast: the fast path agrees with the plain path in the new dtype
    model.half()
    fast = greedy(lm, embeds.half(), mask, 16, graphs=True)
    plain = greedy(lm, embeds.half(), mask, 16, graphs=False)
    assert finite_difference(fast.scores[0], plain.scores[0]) <= BF16_LOGITS_REL * finite_scale(plain.scores[0])
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
    from deepseek_vl2.weights.placement import describe_placement

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
    assert {p.device.index for p in split.parameters()} == {0, 1}
    logits, out = run_case(split, name, n)
    ref_logits, ref_out = run_case(single, name, n)
    assert logits.device == split.device and ref_logits.device == torch.device("cuda:0")
    logits, out.sequences = logits.to(ref_logits.device), out.sequences.to(ref_logits.device)
    out.scores = tuple(s.to(ref_logits.device) for s in out.scores)
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
    assert split.language.is_split
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
    from deepseek_vl2.generation import cuda_graphs

    assert cuda_graphs._DECODERS.get(model.language), "the fast path was not taken"
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
