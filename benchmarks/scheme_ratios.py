"""Quantized schemes against bf16 in one process, the schemes alternating round by round.

    python benchmarks/scheme_ratios.py --variants small --quantization none int8+head int4+head --rounds 5

bench.py measures one scheme after another, each once, and its prompt's forward moves by 20 ms
and more from one measurement to the next (35-65 ms for small), which moves a decode rate taken as
generate(128) minus generate(2) by 5-9%. This script builds every scheme of a variant once (bench.py's
random weights at the real shapes and its 2054-token prompt), warms each up, then measures them in
turn for `--rounds` rounds: each round the prompt's forward (bench.py's prefill, median of 3) and
three pairs of generate(new tokens) and generate(2), batch 1, greedy. Figures per scheme: the
median prefill, and decode tok/s two ways, from the medians of the two generate times and as the
median of the pairs' differences; then each as a multiple of the variant's bf16 ("none") figure.
All schemes share the first scheme's prompt embeddings.
"""
import json
import statistics
from pathlib import Path

import torch

from bench import (
    SCHEMES,
    build_model,
    comparison_parser,
    device_header,
    make_prompt,
    offline_processor,
    prefill_logits,
    timed,
)

PAIRS = 3  # generate(new tokens) / generate(2) pairs a scheme a round


def measure_variant(variant, schemes, processor, rounds, new_tokens) -> dict:
    """{scheme: {prefill: [ms a round], full: [ms], two: [ms]}} for the variant's schemes."""
    conversation, images = make_prompt(processor)
    batch = processor(conversations=conversation, images=images, force_batchify=True).to("cuda")
    models = {scheme: build_model(variant, quantization=scheme) for scheme in schemes}
    with torch.inference_mode():
        embeds = models[schemes[0]].prepare_inputs_embeds(**batch)
        positions = torch.arange(embeds.shape[1], device="cuda")[None]

        def generate(model, n):
            return lambda: model.language.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                   max_new_tokens=n, min_new_tokens=n, do_sample=False)

        for model in models.values():  # compiled regions and graphs before any timing
            generate(model, new_tokens)()
            generate(model, 2)()
        raw = {scheme: dict(prefill=[], full=[], two=[]) for scheme in schemes}
        for _ in range(rounds):
            for scheme, model in models.items():
                raw[scheme]["prefill"].append(
                    timed(lambda: prefill_logits(model.language, embeds, positions), repeats=3, warmup=1) * 1e3)
                for _ in range(PAIRS):  # one timing each, alternating
                    raw[scheme]["full"].append(timed(generate(model, new_tokens), repeats=1, warmup=0) * 1e3)
                    raw[scheme]["two"].append(timed(generate(model, 2), repeats=1, warmup=0) * 1e3)
    del models
    torch.cuda.empty_cache()
    return raw


def summary(variant, scheme, times, new_tokens) -> dict:
    """A scheme's figures from its timings (ms): prefill median, decode tok/s both ways, the timings."""
    steps, full, two = new_tokens - 2, times["full"], times["two"]
    return dict(variant=variant, quantization=scheme, prefill_ms=statistics.median(times["prefill"]),
                decode_tok_s_of_medians=steps * 1e3 / (statistics.median(full) - statistics.median(two)),
                decode_tok_s_paired=steps * 1e3 / statistics.median([f - t for f, t in zip(full, two)]),
                **{f"{key}_ms_each": values for key, values in times.items()})


def main():
    parser = comparison_parser(__doc__, ["none", "int8+head", "int4+head"], SCHEMES, new_tokens=128)
    parser.set_defaults(rounds=5)
    args = parser.parse_args()
    if args.quantization[0] != "none":
        parser.error("--quantization: put none (bf16) first, the schemes are measured against it")
    header = device_header("scheme_ratios.py")
    processor = offline_processor()
    results = []
    for variant in args.variants:
        raw = measure_variant(variant, args.quantization, processor, args.rounds, args.new_tokens)
        results += [summary(variant, scheme, times, args.new_tokens) for scheme, times in raw.items()]
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))
    print("| variant | weights | prefill ms | x bf16 | decode b1 tok/s (of medians) | x bf16 | (paired) | x bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        bf16 = next(b for b in results if b["variant"] == r["variant"] and b["quantization"] == "none")
        cells = [f"{r['prefill_ms']:.1f}", f"{r['prefill_ms'] / bf16['prefill_ms']:.2f}"]
        for key in ("decode_tok_s_of_medians", "decode_tok_s_paired"):
            cells += [f"{r[key]:.0f}", f"{r[key] / bf16[key]:.3f}"]
        weights = "bf16" if r["quantization"] == "none" else r["quantization"]
        print(f"| {r['variant']} | {weights} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
