"""Quantized models on CUDA (skipped without it): the fast decode path (static cache, CUDA graphs,
compiled regions; the int8/int4 gemv kernels) against the plain path, the decode gemv against the
prefill's dequantize-and-GEMM path, the continuous engine's graphs past the gemv's rows,
quantization on the GPU against the CPU's, the memory that quantize-while-loading takes, and the
real `small` shapes in int4 on a 1024x1024 image."""
import pytest
import torch
from safetensors import safe_open

from decode_paths import assert_same_or_near_tie, greedy, text_prompt
from deepseek_vl2.engine import ChatEngine, GenerationParams
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.decode_steps import compilations
from deepseek_vl2.kernels import dispatch
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.quantization import rtn
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.swap import quantize_modules
from deepseek_vl2.quantization.weight import QuantizedWeight
from deepseek_vl2.weights.random_init import init_random_weights
from goldens import CHECKPOINTS, FIXTURES, rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_LOGITS_REL = 3e-2  # as tests/gpu/test_cuda.py: bf16 noise after a few layers of random tiny weights
# the decode gemv against the prefill path: on top of that noise, the prefill's dense GEMMs read the weights
# dequantized and rounded to bf16 while the gemv dequantizes in float32 registers (measured on an H200:
# 0.031 for small_mla int8, the others below 0.03)
QUANT_PATHS_REL = 5e-2
# the two schemes, and int4 with the LM head in int8 (its gemv at one row, its dense tiles past that)
SCHEMES = pytest.mark.parametrize("scheme", ["int8", "int4", QuantizationConfig("int4", lm_head=True)],
                                  ids=["int8", "int4", "int4+head"])


def quantized_cuda(name, scheme, warm_up=False):
    return DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[name]), dtype=torch.bfloat16, device_map="cuda",
                                                   quantization=scheme, progress=False, warm_up=warm_up)


@pytest.mark.parametrize("compile_after", [0, 2048], ids=["compiled", "plain-graphs"])
@SCHEMES
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_fast_path_matches_plain_path(name, scheme, compile_after):
    model = quantized_cuda(name, scheme)
    model.language.compile_decode_after = compile_after
    embeds, mask = text_prompt(model)
    fast = greedy(model.language, embeds, mask, 48, graphs=True)
    plain = greedy(model.language, embeds, mask, 48, graphs=False)
    assert fast.sequences.shape == plain.sequences.shape == (1, 48)
    assert_same_or_near_tie(fast, plain)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_warm_up_and_batched_rows(scheme):
    """from_pretrained's warm-up (graphs captured on the quantized kernels), then a batch of 3 rows
    (the gemv with 3 token rows) against each row alone."""
    model = quantized_cuda("small_mla", scheme, warm_up=True)
    embeds, mask = text_prompt(model)
    rows = torch.cat([embeds, text_prompt(model, seed=1)[0], text_prompt(model, seed=2)[0]])
    batch = greedy(model.language, rows, mask.repeat(3, 1), 24, graphs=True)
    for row in range(3):
        alone = greedy(model.language, rows[row:row + 1], mask, 24, graphs=True)
        row_out = type(batch)(sequences=batch.sequences[row:row + 1], scores=tuple(s[row:row + 1] for s in batch.scores))
        assert_same_or_near_tie(row_out, alone)


@SCHEMES
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_decode_gemv_matches_prefill_path(name, scheme):
    """The last token's logits by a one-token decode step (the quantized gemv kernels) and by the
    prefill of the whole prompt (dequantized weights and GEMMs)."""
    model = quantized_cuda(name, scheme)
    lm = model.language
    embeds, _ = text_prompt(model, length=24)
    with torch.no_grad():
        whole = lm(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]
        past = lm(inputs_embeds=embeds[:, :-1], use_cache=True).past_key_values
        step = lm(inputs_embeds=embeds[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    assert rel_err(step, whole) <= QUANT_PATHS_REL


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_on_the_gpu_matches_the_cpu(scheme):
    gpu = quantized_cuda("base_noaux", scheme)
    cpu = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS["base_noaux"]), dtype=torch.bfloat16,
                                                  quantization=scheme, progress=False)
    cpu_weights = dict(cpu.named_modules())
    for name, module in gpu.named_modules():
        if isinstance(module, QuantizedWeight):
            other = cpu_weights[name]
            assert torch.equal(module.scale.cpu(), other.scale), name
            a, b = module.qweight.cpu(), other.qweight
            if module.bits == 4:
                a, b = rtn.unpack_int4(a), rtn.unpack_int4(b)
            steps = (a.int() - b.int()).abs()
            assert steps.max() <= 1 and steps.float().mean() < 1e-3, f"{name}: {int((steps > 0).sum())} differ"


def test_quantize_while_loading_never_holds_the_full_weights():
    """Peak GPU memory while loading is the quantized model plus a few copies of one checkpoint tensor."""
    path = CHECKPOINTS["base_noaux"]
    largest = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as shard:
            largest = max(largest, max(torch.Size(shard.get_slice(k).get_shape()).numel() for k in shard.keys()))
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = quantized_cuda("base_noaux", "int4")
    weights = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    quantized = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n)
    full = sum(m.qweight.numel() * 2 * 2 for m in model.modules() if isinstance(m, QuantizedWeight))  # as bf16
    assert peak - weights <= 8 * 4 * largest + 2**20, f"loading took {peak - weights} bytes beyond the weights"
    assert quantized < full


def test_real_small_int4_on_a_1024_image(tmp_path):
    """small at its real shapes with random int4 weights (made one expert at a time): its weights take
    the quantized size, and the fast path's greedy tokens on a 1024x1024 image equal the plain path's."""
    from PIL import Image

    from deepseek_vl2.models import DeepseekVLV2Processor
    from deepseek_vl2.offline_checkpoint import make_offline_checkpoint

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    config = DeepseekVLV2Config.from_pretrained(str(FIXTURES / "real_shapes" / "small"))
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config).to(torch.bfloat16)
    quantize_modules(model, QuantizationConfig("int4"), torch.bfloat16)
    model = init_random_weights(model.to_empty(device="cuda"), seed=0).eval()
    assert (torch.cuda.memory_allocated() - before) / 2**30 < 9.6  # 9.46 GiB of parameters (30.3 in bf16)
    processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(tmp_path / "ckpt")))
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    conversation = [{"role": "<|User|>", "content": "<image>\nDescribe the picture in detail, please."},
                    {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=conversation, images=[image], force_batchify=True).to("cuda")
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch)
    fast = greedy(model.language, embeds, batch.attention_mask, 64, graphs=True)
    plain = greedy(model.language, embeds, batch.attention_mask, 64, graphs=False)
    assert_same_or_near_tie(fast, plain)
    del model
    torch.cuda.empty_cache()


@SCHEMES
@torch.inference_mode()  # as the engine steps
def test_continuous_engine_graphs_beyond_the_gemv_rows(scheme):
    """The continuous engine (the server's) on a quantized model with more rows than the gemv takes:
    its decode graphs at 2 rows (the quantized gemv) and at 20 (past dispatch's gemv limits: the
    experts' grouped GEMM, the projections' dense tiles or dequantized weights) give the eager step's
    logits; then
    twenty requests at once run through the graphs alone, with no compilation after start-up, and
    free every slot."""
    chat = ChatEngine.load(str(CHECKPOINTS["tiny_mha"]), device="cuda", dtype=torch.bfloat16, quantization=scheme)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=20, max_length=600)
    steps = engine.steps
    assert steps.row_sizes == (1, 2, 4, 8, 16, 20)
    limits = [*dispatch.QUANT_EXPERT_GEMV_ROWS.values(), *dispatch.QUANT_LINEAR_GEMV_ROWS.values()]
    assert 2 <= min(limits) and max(limits) < 20
    generator = torch.Generator().manual_seed(0)
    for layer in engine.slots.cache.storage:
        layer.copy_(torch.randn(layer.shape, generator=generator).to(layer))
    for rows in (2, 20):
        tokens = torch.randint(0, engine.vocab_size, (rows,), generator=generator).cuda()
        positions = torch.randint(1, 500, (rows,), generator=generator).tolist()
        steps.load(tokens, positions, [True] * rows)
        graph = steps.run(rows, 512).clone()
        steps.load(tokens, positions, [True] * rows)
        captured = steps.graphs.pop((rows, 512))
        eager = steps.run(rows, 512)
        steps.graphs[(rows, 512)] = captured
        assert rel_err(graph.float(), eager.float()) < BF16_LOGITS_REL, f"{rows} rows"
    eager_steps, compiled = steps.eager_steps, compilations()
    conversation = [{"role": "<|User|>", "content": "Count the animals."}, {"role": "<|Assistant|>", "content": ""}]
    handles = [engine.submit(engine.prepare_one(conversation, []), GenerationParams(max_new_tokens=20, temperature=0))
               for _ in range(20)]
    while engine.has_work():
        engine.step()
    results = [handle.result(timeout=0) for handle in handles]
    assert engine.stats.max_running == 20 and engine.slots.free_count == 20
    assert steps.eager_steps == eager_steps and compilations() == compiled
    assert all(result.token_ids == results[0].token_ids for result in results)  # the same prompt, greedy
    assert all(len(result.token_ids) == 20 or result.finish_reason == "stop" for result in results)
