"""Benchmark DeepSeek-VL2 inference at the real tiny / small / base shapes on one CUDA GPU.

    python benchmarks/bench.py --variants tiny small base --json results.json
    python benchmarks/bench.py --variants small --quantization none int8 int4 --json $OUT/quant.json

Each model is built with random bf16 weights directly on the GPU (no download, no fp32 copy)
from the release's config.json; with --quantization int8 / int4 its decoder weights are drawn
one expert at a time and quantized (no bf16 copy of them either; int8+head / int4+head: the LM
head too, in int8), and each scheme's figures are
also given relative to the bf16 ("none") model of the same variant measured in the same call.
The prompt is what the real processor makes of a 1024x1024 image (3x3 tiles + global view:
2017 image tokens) and a ~32-token question, 2054 tokens in all (the tokenizer is the offline one;
the released vocabulary size is kept). Timings use CUDA synchronisation after warm-up and report
the median of repeats:

  processor      the processor on the CPU (PIL tiling, tokenisation)
  vision         prepare_inputs_embeds: SigLIP tower + projector on 10 tiles, merge
  prefill        the decoder over the 2054 prompt embeddings, logits of the last position
  ttft           generate(max_new_tokens=1) from the processor's batch: its checks, vision,
                 prefill and the first token (from the thirtieth session on; before, the
                 vision and prefill calls above in a row and the first token's argmax)
  decode bN      greedy decoding at batch N: tokens/s over all rows, from generate(128 new tokens)
                 minus generate(2 new tokens), so host work per step is included; the rows are
                 the prompt with a little noise of their own each, so they route apart (from the
                 ninth session on: before, the rows were one prompt repeated and picked the same
                 experts)
  weights        torch.cuda.memory_allocated after building the model
  peak           torch.cuda.max_memory_allocated over a batch-1 vision + generate run
  roofline       batch-1 decode tokens/s if every step only moved the active weights and the
                 KV cache once at the device-to-device copy bandwidth measured here
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepseek_vl2.generation.cuda_graphs import release_decoders  # noqa: E402
from deepseek_vl2.modeling.kv_cache import KVCache  # noqa: E402
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.offline_checkpoint import make_offline_checkpoint  # noqa: E402
from deepseek_vl2.quantization.config import QuantizationConfig  # noqa: E402
from deepseek_vl2.quantization.swap import quantize_modules  # noqa: E402
from deepseek_vl2.weights.random_init import init_random_weights  # noqa: E402

CONFIGS = REPO / "tests" / "fixtures" / "real_shapes"
QUESTION = "Describe everything you can see in this picture: the objects, their colours and the whole scene."


def timed(fn, repeats=5, warmup=2):
    """Median seconds of `fn()` with CUDA synchronisation around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * src.numel() / seconds


# weight schemes a model can be built in: bf16, the decoder layers in int8 / int4, and those with the
# LM head in int8 too (QuantizationConfig's lm_head)
SCHEMES = ["none", "int8", "int4", "int8+head", "int4+head"]


def build_model(variant: str, compile_at_once: bool = True, quantization: str = "none") -> DeepseekVLV2ForCausalLM:
    """Random bf16 weights at the release's shapes on the GPU (quantized as `quantization`, one of
    SCHEMES). `compile_at_once`: the decode steps are compiled from the first step (the steady state
    this script measures), not after `compile_decode_after` steps as by default."""
    config = DeepseekVLV2Config.from_pretrained(str(CONFIGS / variant))
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    if quantization != "none":
        scheme, _, head = quantization.partition("+")
        quantize_modules(model, QuantizationConfig(scheme, lm_head=head == "head"), torch.bfloat16)
    model = model.to_empty(device="cuda")
    model = init_random_weights(model, seed=0).eval()
    if compile_at_once:
        model.language.compile_decode_after = 0
    return model


def make_prompt(processor, total_tokens: int = 2054):
    """A 1024x1024 image and QUESTION, trimmed or padded with words to `total_tokens` prompt tokens."""
    from PIL import Image

    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    words = QUESTION.split()
    for _ in range(40):
        conversation = [{"role": "<|User|>", "content": "<image>\n" + " ".join(words)},
                        {"role": "<|Assistant|>", "content": ""}]
        n = processor(conversations=conversation, images=[image], force_batchify=True).input_ids.shape[1]
        if n == total_tokens:
            break
        words = words[:-1] if n > total_tokens else words + ["a"]
    return conversation, [image]


def active_decode_bytes(model, context: int, batch: int) -> float:
    """Bytes one decode step must read: the weights the batch activates (as stored: quantized ones
    at their quantized size, scales included) plus its KV cache."""
    lm = model.language
    c = lm.config
    total = 0
    for layer in lm.model.layers:
        total += stored_bytes(layer.self_attn) + stored_bytes(layer.input_layernorm)
        total += stored_bytes(layer.post_attention_layernorm)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            E, k = c.n_routed_experts, c.num_experts_per_tok
            distinct = E * (1 - (1 - k / E) ** batch)  # expected routed experts hit by `batch` tokens
            per_expert = stored_bytes(mlp.experts) / mlp.experts.num_experts
            total += (distinct + mlp.num_shared) * per_expert + stored_bytes(mlp.gate)
        else:
            total += stored_bytes(mlp)
    total += stored_bytes(lm.lm_head) + stored_bytes(lm.model.norm)
    if c.use_mla:
        kv_per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    else:
        kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return total + batch * context * kv_per_token * (torch.finfo(lm.dtype).bits // 8)


def stored_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def comparison_parser(doc: str, quantization: list, schemes: list, new_tokens: int) -> argparse.ArgumentParser:
    """The arguments of the scripts that measure settings against each other on bench.py's models:
    --variants, --quantization (`schemes` to choose from), --rounds, --new-tokens, --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small"], choices=["tiny", "small", "base"])
    parser.add_argument("--quantization", nargs="+", default=quantization, choices=schemes)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per setting, the settings alternating")
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--json", help="write the results here")
    return parser


def device_header(script: str) -> dict:
    """A benchmark run's GPU, torch version, date and command (printed as its first line); exits
    with a message where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['date']}", flush=True)
    return header


def decode_rate(model, embeds, mask, batch: int, new_tokens: int, repeats: int, sampled: bool = False):
    """Aggregate decode tokens/s: (generate of new_tokens) minus (generate of 2 tokens) is the time
    of new_tokens - 2 decode steps, host loop included. Also returns the two times (ms).

    Each row after the first gets the prompt's embeddings plus a little noise of its own: rows of one
    prompt would choose the same tokens and route to the same few experts at every step, where
    served rows spread over them (an MoE step reads the experts its rows choose). Greedy rows of a
    random-weight model still often fall into the same loop of tokens (benchmarks/RESULTS.md,
    2026-12-02); `sampled` rows (seeded sampling, transformers' default top-k 50) choose tokens
    of their own and route apart, as different requests would."""
    noise = torch.randn(batch, *embeds.shape[1:], device=embeds.device,
                        generator=torch.Generator(embeds.device).manual_seed(0)) * embeds.float().std()
    noise[0] = 0
    embeds = (embeds.float() + 0.1 * noise).to(embeds.dtype)
    mask = mask.expand(batch, -1).contiguous()

    def run(n):
        generator = torch.Generator(embeds.device).manual_seed(0) if sampled else None
        return lambda: model.language.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                               min_new_tokens=n, do_sample=sampled, generator=generator)

    full = timed(run(new_tokens), repeats=repeats, warmup=1)
    two = timed(run(2), repeats=repeats, warmup=1)
    return batch * (new_tokens - 2) / (full - two), dict(generate_2_ms=two * 1e3, generate_n_ms=full * 1e3)


def bench_variant(variant, processor, batches, new_tokens, repeats, bandwidth, quantization="none"):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build_model(variant, quantization=quantization)
    build_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30
    conversation, images = make_prompt(processor)
    processor_s = statistics.median(
        [timed_cpu(lambda: processor(conversations=conversation, images=images, force_batchify=True))
         for _ in range(5)])
    batch = processor(conversations=conversation, images=images, force_batchify=True).to("cuda")
    T = batch.input_ids.shape[1]
    lm = model.language
    with torch.inference_mode():
        vision_s = timed(lambda: model.prepare_inputs_embeds(**batch))
        embeds = model.prepare_inputs_embeds(**batch)
        positions = torch.arange(T, device="cuda")[None]

        prefill_s = timed(lambda: prefill_logits(lm, embeds, positions))
        ttft_s = timed(lambda: first_token(model, batch))
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        e = model.prepare_inputs_embeds(**batch)
        lm.generate(inputs_embeds=e, attention_mask=batch.attention_mask, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    rates, loop_times = {}, {}
    for b in batches:
        rates[b], loop_times[b] = decode_rate(model, embeds, batch.attention_mask, b, new_tokens, repeats)
        release_decoders(lm)  # free this batch size's static cache
        torch.cuda.empty_cache()
    roofline = bandwidth / active_decode_bytes(model, T + new_tokens // 2, 1)
    result = dict(variant=variant, quantization=quantization, prompt_tokens=T, tiles=int(batch.images.shape[1]), build_s=build_s,
                  weights_gib=weights_gib, processor_ms=processor_s * 1e3, vision_ms=vision_s * 1e3,
                  prefill_ms=prefill_s * 1e3, ttft_ms=ttft_s * 1e3, peak_gib=peak_gib,
                  decode_tok_s={str(b): r for b, r in rates.items()},
                  generate_ms={str(b): t for b, t in loop_times.items()}, roofline_b1_tok_s=roofline,
                  roofline_b1_pct=100 * rates.get(1, float("nan")) / roofline)
    return result


def prefill_logits(lm, embeds, positions):
    """The decoder over one prompt's embeddings into a fresh cache: the last position's logits [1, 1, vocab].
    No attention mask: the bench prompt pads nothing, and generate passes none then."""
    cache = KVCache(lm.config, 1, embeds.shape[1], "cuda", lm.dtype)
    return lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, logits_to_keep=1).logits


def first_token(model, batch):
    """The first answer token of the processor's batch, as a user's generate call makes it."""
    return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
                          images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
                          max_new_tokens=1, do_sample=False)


def relative_to_bf16(result, earlier) -> None:
    """Add a quantized result's prefill time and decode rates as multiples of the bf16 ("none")
    result of the same variant measured earlier in this call, if there is one."""
    base = next((r for r in earlier if r["variant"] == result["variant"] and r["quantization"] == "none"), None)
    if base is None or result["quantization"] == "none":
        return
    result["prefill_vs_bf16"] = result["prefill_ms"] / base["prefill_ms"]
    result["decode_vs_bf16"] = {b: rate / base["decode_tok_s"][b] for b, rate in result["decode_tok_s"].items()
                                if b in base["decode_tok_s"]}
    if "1" in result["decode_vs_bf16"]:
        result["decode_b1_vs_bf16"] = result["decode_vs_bf16"]["1"]


def offline_processor() -> DeepseekVLV2Processor:
    """The real processor with the offline tokenizer (no download)."""
    with tempfile.TemporaryDirectory() as tmp:
        return DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(Path(tmp) / "ckpt")))


def cuda_prompt_batch():
    """The bench prompt (make_prompt) through the offline processor, as a batch on the GPU."""
    processor = offline_processor()
    conversation, images = make_prompt(processor)
    return processor(conversations=conversation, images=images, force_batchify=True).to("cuda")


def timed_cpu(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small", "base"], choices=["tiny", "small", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=SCHEMES,
                        help="weight schemes to measure each variant in (none: bf16; +head: the LM head in int8)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    processor = offline_processor()
    bandwidth = copy_bandwidth()
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  copy_bandwidth_tb_s=bandwidth / 1e12, new_tokens=args.new_tokens, command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['date']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    results = []
    for variant in args.variants:
        for scheme in args.quantization:
            r = bench_variant(variant, processor, args.batches, args.new_tokens, args.repeats, bandwidth, scheme)
            torch.cuda.empty_cache()  # the variant's model is gone with bench_variant's frame
            relative_to_bf16(r, results)
            results.append(r)
            print(json.dumps(r), flush=True)
    cols = ["variant", "weights", "prompt", "processor ms", "vision ms", "prefill ms", "ttft ms"] + \
        [f"decode b{b} tok/s" for b in args.batches] + ["% roofline b1", "weights GiB", "peak GiB",
                                                       "prefill / bf16", "decode b1 / bf16"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        ratios = [f"{r[key]:.2f}" if key in r else "" for key in ("prefill_vs_bf16", "decode_b1_vs_bf16")]
        row = [r["variant"], "bf16" if r["quantization"] == "none" else r["quantization"], str(r["prompt_tokens"]),
               f"{r['processor_ms']:.0f}", f"{r['vision_ms']:.1f}", f"{r['prefill_ms']:.1f}", f"{r['ttft_ms']:.1f}"] + \
            [f"{r['decode_tok_s'][str(b)]:.0f}" for b in args.batches] + \
            [f"{r['roofline_b1_pct']:.0f}% of {r['roofline_b1_tok_s']:.0f}", f"{r['weights_gib']:.2f}",
             f"{r['peak_gib']:.1f}"] + ratios
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))


if __name__ == "__main__":
    main()
