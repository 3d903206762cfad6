"""Decode and prefill with and without programmatic dependent launch, alternating, in one process.

    python benchmarks/dependent_launch.py --variants small --quantization none int4 int8 --rounds 2

kernels/custom_ops.py can launch our Triton kernels and torch.compile's as programmatic dependent
launches (PDL) on compute capability 9.0 and later, each free to start while the kernel before it
ends (off by default; DEEPSEEK_VL2_DEPENDENT_LAUNCH=1 turns it on for a process).
This script builds each model once (bench.py's random weights at the real shapes and its
2054-token prompt) and measures it `--rounds` times in each mode, off then on: the decoders are
dropped and built again (compiled with the mode's inductor option, graphs captured with its
launches) before each measurement. Figures: batch-1 decode tok/s as bench.py takes them
(generate(128) minus generate(2)), prefill ms, and where the greedy tokens of each round first
leave those of the first round (off), with the first round's top-2 score margin there and the
largest score difference up to there: a margin within that difference is a near-tie.

Each rebuild compiles afresh, and torch.compile picks some of its reduction kernels' tiles by timing
them, which can change the order of float32 sums; with near-flat random-weight logits that can flip
a near-tie. TORCHINDUCTOR_DETERMINISTIC=1 in the environment makes inductor choose without timing.
"""
import json
import statistics
import time
from pathlib import Path

import torch

from bench import (
    build_model,
    comparison_parser,
    decode_rate,
    device_header,
    make_prompt,
    offline_processor,
    prefill_logits,
    timed,
)
from deepseek_vl2.generation.cuda_graphs import release_decoders
from deepseek_vl2.kernels import custom_ops

MODES = {"off": False, "on": True}


def measure(model, batch, embeds, new_tokens, repeats):
    """(decode tok/s at batch 1, prefill ms, greedy tokens, their scores [steps, vocab] on the host)
    with the current launch mode."""
    lm = model.language
    release_decoders(lm)
    torch.cuda.empty_cache()
    positions = torch.arange(embeds.shape[1], device="cuda")[None]
    prefill_ms = timed(lambda: prefill_logits(lm, embeds, positions)) * 1e3
    greedy = lm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, output_scores=True)
    rate, _ = decode_rate(model, embeds, batch.attention_mask, 1, new_tokens, repeats)
    return rate, prefill_ms, greedy.sequences[0].tolist(), torch.stack([s[0] for s in greedy.scores]).float().cpu()


def first_difference(a, b):
    """The first position where token lists a and b differ, None where they agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def parting(reference, run):
    """Where run's greedy tokens first leave reference's (each a (tokens, scores) pair), with the
    reference's top-2 score margin there and the largest score difference up to there (scores -inf
    in both, the suppressed end token, left out): a margin within the difference is a near-tie."""
    step = first_difference(reference[0], run[0])
    if step is None:
        return None
    a, b = reference[1][:step + 1], run[1][:step + 1]
    finite = a.isfinite() & b.isfinite()
    top = reference[1][step].topk(2).values
    return dict(step=step, margin=(top[0] - top[1]).item(), difference=(a - b)[finite].abs().max().item())


def run_scheme(variant, scheme, processor, rounds, new_tokens, repeats):
    started = time.perf_counter()
    model = build_model(variant, quantization=scheme)
    conversation, images = make_prompt(processor)
    batch = processor(conversations=conversation, images=images, force_batchify=True).to("cuda")
    figures = {mode: dict(decode_tok_s=[], prefill_ms=[]) for mode in MODES}
    partings = {mode: [] for mode in MODES}
    reference = None
    default = custom_ops.DEPENDENT_LAUNCH
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(**batch)
        for _ in range(rounds):
            for mode, on in MODES.items():
                custom_ops.DEPENDENT_LAUNCH = on
                rate, prefill_ms, *greedy = measure(model, batch, embeds, new_tokens, repeats)
                if reference is None:  # the first round, with them off
                    reference = greedy
                partings[mode].append(parting(reference, greedy))
                figures[mode]["decode_tok_s"].append(rate)
                figures[mode]["prefill_ms"].append(prefill_ms)
                print(f"  {variant} {scheme} {mode}: decode {rate:.1f} tok/s, prefill {prefill_ms:.1f} ms", flush=True)
    custom_ops.DEPENDENT_LAUNCH = default
    release_decoders(model.language)
    return dict(variant=variant, quantization=scheme, seconds=time.perf_counter() - started, partings=partings,
                **{f"{mode}_{key}": values for mode, d in figures.items() for key, values in d.items()},
                **{f"{mode}_{key}_median": statistics.median(values) for mode, d in figures.items()
                   for key, values in d.items()})


def main():
    parser = comparison_parser(__doc__, ["none", "int4"], ["none", "int8", "int4"], new_tokens=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header = device_header("dependent_launch.py")
    processor = offline_processor()
    results = []
    for variant in args.variants:
        for scheme in args.quantization:
            results.append(run_scheme(variant, scheme, processor, args.rounds, args.new_tokens, args.repeats))
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))
    print("| variant | weights | decode b1 off | on | on / off | vs bf16 off | vs bf16 on | prefill ms off | on "
          "| tokens against off's first round: off, on |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table_row(r, results) for r in results))


def table_row(r: dict, results: list) -> str:
    """A result as a row of the table, with its ratios to the bf16 result of its variant."""
    bf16 = next((b for b in results if b["variant"] == r["variant"] and b["quantization"] == "none"), None)
    off, on = r["off_decode_tok_s_median"], r["on_decode_tok_s_median"]
    ratios = [f"{off / bf16['off_decode_tok_s_median']:.2f}", f"{on / bf16['on_decode_tok_s_median']:.2f}"] \
        if bf16 and bf16 is not r else ["", ""]
    same = "; ".join(", ".join("same" if p is None else
                               f"differ at {p['step']} (margin {p['margin']:.3g}, difference {p['difference']:.3g})"
                               for p in r["partings"][mode]) for mode in MODES)
    weights = "bf16" if r["quantization"] == "none" else r["quantization"]
    return (f"| {r['variant']} | {weights} | {off:.0f} | {on:.0f} | {on / off:.3f} | {' | '.join(ratios)} | "
            f"{r['off_prefill_ms_median']:.1f} | {r['on_prefill_ms_median']:.1f} | {same} |")


if __name__ == "__main__":
    main()
