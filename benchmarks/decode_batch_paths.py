"""Batch decode of a quantized model with dispatch's decode-batch paths as they are and with one
of them turned off, alternating in one process, beside the bf16 model.

    python benchmarks/decode_batch_paths.py --variants small --quantization int4 int8 --batches 8 16 32 \
        --settings now "no expert scan" --sampled --rounds 2

Settings ("now" is the dispatch as it is):
  "no expert scan"  quantized experts through the gemv up to 8 rows and the sorted grouped GEMM past
                    them, not moe_decode.quant_expert_gemm (dispatch.QUANT_EXPERT_SCAN_ROWS) from 5
                    rows (the thirty-first session's change)
  "expert scan to 32"  the scan from 5 to 32 rows at both widths (the sorted grouped GEMM past)
  "no dense tiles"  a linear layer's rows past the gemv's on its weight dequantized whole into a bf16
                    copy for cuBLAS, not the grouped GEMM's dense tiles (dispatch.QUANT_LINEAR_TILE_ROWS;
                    the thirtieth session's)
Figures are bench.py's aggregate decode tok/s (generate(n) - generate(2), host loop included, each
row its own noise; with --sampled each row samples its own tokens, so rows route apart as different
requests do); the decoders are dropped and built again (compiled, captured) for each setting.
"""
import contextlib
import json
import statistics
from pathlib import Path

import torch

from bench import build_model, comparison_parser, cuda_prompt_batch, decode_rate, device_header
from deepseek_vl2.generation.cuda_graphs import release_decoders
from deepseek_vl2.kernels import dispatch

SETTINGS = {"now": contextlib.nullcontext, "no expert scan": lambda: dispatch.quant_expert_rows(8, 0),
            "expert scan to 32": lambda: dispatch.quant_expert_rows(4, 32),
            "no dense tiles": lambda: dispatch.quant_linear_tile_rows(0)}


def measured(model, batch, embeds, batches, new_tokens, rounds, settings, sampled):
    """{setting: {batch: [tok/s per round]}}, settings alternating within each round."""
    rates = {name: {b: [] for b in batches} for name in settings}
    for _ in range(rounds):
        for b in batches:
            for name, setting in settings.items():
                with setting():
                    release_decoders(model.language)
                    rate, _ = decode_rate(model, embeds, batch.attention_mask, b, new_tokens, repeats=2,
                                          sampled=sampled)
                rates[name][b].append(rate)
                print(f"  {name}, batch {b}: {rate:.0f} tok/s", flush=True)
    release_decoders(model.language)
    return rates


def main():
    parser = comparison_parser(__doc__, ["int4"], ["int8", "int4"], new_tokens=64)
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--settings", nargs="+", default=["now", "no expert scan"], choices=list(SETTINGS))
    parser.add_argument("--sampled", action="store_true", help="rows sample their tokens (route apart)")
    args = parser.parse_args()
    header = device_header("decode_batch_paths.py")
    batch = cuda_prompt_batch()
    results, rows = [], []
    for variant in args.variants:
        for scheme in ["none", *args.quantization]:
            model = build_model(variant, quantization=scheme)
            with torch.inference_mode():
                embeds = model.prepare_inputs_embeds(**batch)
                settings = ({"bf16": SETTINGS["now"]} if scheme == "none"
                            else {name: SETTINGS[name] for name in args.settings})
                rates = measured(model, batch, embeds, args.batches, args.new_tokens, args.rounds, settings,
                                 args.sampled)
            del model, embeds
            torch.cuda.empty_cache()
            results.append(dict(variant=variant, quantization=scheme, sampled=args.sampled, tok_s=rates))
            for name, by_batch in rates.items():
                rows.append(f"| {variant} | {name if scheme == 'none' else f'{scheme}, {name}'} | "
                            + " | ".join(f"{statistics.median(by_batch[b]):.0f}" for b in args.batches) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))
    print("| variant | weights, path | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
