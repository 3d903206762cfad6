"""A quantized model's prefill with its expert stacks dequantized tile by tile (the grouped GEMM of
kernels/quant_grouped_gemm.py) and whole (one kernel into a bfloat16 scratch, then torch's grouped
GEMM), alternating in one process, beside the bf16 model's prefill; bench.py's random weights at the
real shapes and its 2054-token prompt.

    python benchmarks/stack_dequantize.py --variants base small --quantization int4 --rounds 3

Per round and path: prefill ms (bench.py's median of 5), the peak memory the prefill allocates beyond
what was allocated before it, and the largest difference of the last position's logits from the
tile path's (none for int4, whose tiles dequantize to the same bf16 weights; int8's tiles apply the
scale after the products, so a small one there).
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from bench import build_model, cuda_prompt_batch, device_header, prefill_logits, timed
from deepseek_vl2.kernels import dispatch

PATHS = {"tiles": None, "whole": 0}  # dispatch.stack_dequantize_rows: never / always dequantized whole


def prefill(model, batch):
    """(prefill ms, GiB allocated at the peak beyond what was allocated before, last logits) of one model."""
    lm = model.language
    embeds = model.prepare_inputs_embeds(**batch)
    positions = torch.arange(embeds.shape[1], device="cuda")[None]
    run = lambda: prefill_logits(lm, embeds, positions)  # noqa: E731
    ms = timed(run) * 1e3
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logits = run()[0, -1].float()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**30, logits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["base"], choices=["tiny", "small", "base"])
    parser.add_argument("--quantization", nargs="+", default=["int4"], choices=["int8", "int4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    header = device_header("stack_dequantize.py")
    batch = cuda_prompt_batch()
    results = []
    for variant in args.variants:
        models = {"bf16": build_model(variant)}
        for scheme in args.quantization:
            models[scheme] = build_model(variant, quantization=scheme)
        runs = {}
        with torch.inference_mode():
            for _ in range(args.rounds):
                ms, peak, _ = prefill(models["bf16"], batch)
                runs.setdefault("bf16", []).append(dict(ms=ms, peak_gib=peak))
                for scheme in args.quantization:
                    reference = None
                    for path, rows in PATHS.items():
                        with dispatch.stack_dequantize_rows(rows):
                            ms, peak, logits = prefill(models[scheme], batch)
                        reference = logits if reference is None else reference
                        runs.setdefault(f"{scheme} {path}", []).append(
                            dict(ms=ms, peak_gib=peak, logit_diff=(logits - reference).abs().max().item()))
        bf16 = statistics.median(r["ms"] for r in runs["bf16"])
        for name, rounds in runs.items():
            ms = statistics.median(r["ms"] for r in rounds)
            result = dict(variant=variant, path=name, prefill_ms=ms, over_bf16=ms / bf16,
                          rounds=rounds, peak_gib=max(r["peak_gib"] for r in rounds))
            results.append(result)
            print(f"{variant} {name}: prefill {ms:.1f} ms (x{ms / bf16:.3f} bf16; rounds "
                  + ", ".join(f"{r['ms']:.1f}" for r in rounds) + f"), peak beyond the weights {result['peak_gib']:.2f} GiB"
                  + (f", largest logit difference from tiles {max(r['logit_diff'] for r in rounds):.3g}"
                     if "logit_diff" in rounds[0] else ""), flush=True)
        del models
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))


if __name__ == "__main__":
    main()
