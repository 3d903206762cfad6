"""Time the int8 / int4 gemv kernels (kernels/quant_gemv.py) at the real shapes of tiny, small and base
over tile configurations, to set `quant_gemv.gemv_tiles`; with the bf16 kernels they replace (the
expert gemv of kernels/gemv.py, cuBLAS for the projections) and the prefill's dequantization of a
layer's expert stacks and one MoE layer of a prefill (bf16 against both quantized paths) alongside.
Gemv timings are per call inside a CUDA graph, weights from HBM (kernel_timing.py); the prefill
layer's are CUDA-event means over 10 calls. Prints one line per shape and writes everything as JSON.

    python benchmarks/quant_gemv_configs.py --out $OUT/quant_gemv_configs.json [--schemes int8 int4]
        [--variants tiny small base] [--rows 1 8]
        [--only experts|projections|dequantize|prefill|decode-rows|grouped-rows|dense-rows]
        [--prefill-tokens 512 2054]

`--only decode-rows --rows 8 16 32 64`: a continuous-batching decode step's rows through each
quantized path dispatch.py could take (the gemv; the experts' scanning GEMM (moe_decode) or sorted
grouped GEMM; the projections' dense tiles or dequantized weight with cuBLAS), default tiles, beside
the bf16 paths; each row's experts drawn at random.

`--only dense-rows --rows 4 16 64`: the quantized linear layers at a decode batch's rows through each
path (as decode-rows does) and the grouped GEMM's dense tiles (one weight for every row, weight tile
first) swept over their tiles (dispatch.QUANT_LINEAR_TILE_ROWS, quant_grouped_gemm.dense_tiles).

`--only grouped-rows --rows 16 32 ... 2054`: the quantized grouped GEMM on both stacks for that many
tokens (8 pairs each: 6 routed, the 2 shared), in 16-row programs that dot weight tile first and in
the rows-first programs (128 rows int4, 64 int8), default tiles, beside torch's bf16 grouped GEMM;
CUDA-event means (quant_grouped_gemm.FEW_ROWS is where the two cross).
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.kernels import gemv as bf16_gemv, quant_gemv, quant_grouped_gemm  # noqa: E402
from deepseek_vl2.quantization import rtn  # noqa: E402
from deepseek_vl2.quantization.config import QuantizationConfig  # noqa: E402
from deepseek_vl2.quantization.weight import QuantizedWeight  # noqa: E402
from kernel_timing import copies_for, graph_us  # noqa: E402

EXPERTS = {"tiny": (64, 896, 1280), "small": (64, 1408, 2048), "base": (72, 1536, 2560)}  # (E, I, h)
PROJECTIONS = {  # (N, K) of each quantized linear layer of a decode step
    "tiny qkv": (3840, 1280), "tiny o": (1280, 1280), "tiny dense gate_up": (13696, 1280),
    "tiny dense down": (1280, 6848),
    "small q_kv_a": (3648, 2048), "small o": (2048, 2048),
    "small dense gate_up": (21888, 2048), "small dense down": (2048, 10944),
    "base q_kv_a": (6720, 2560), "base o": (2560, 4096),
    "base dense gate_up": (24576, 2560), "base dense down": (2560, 12288),
}
CONFIGS = list(itertools.product((1, 2, 4, 8), (256, 512, 1024, 2048), (1, 2, 4, 8), (1, 3)))  # + stages
MAX_TILE_BYTES = 8192  # weight bytes of one tile; larger tiles spill the per-position accumulators


def fits(scheme, config):
    """A tile within MAX_TILE_BYTES (pipeline stages apply to word tiles, which every shape here takes)."""
    block_n, block_k, _, _ = config
    return block_n * block_k // (2 if scheme == "int4" else 1) <= MAX_TILE_BYTES
EXPERTS_PER_TOKEN = 8  # 6 routed + 2 shared


def quantized(shape, scheme):
    weight = torch.randn(*shape, device="cuda") * 0.02
    config = QuantizationConfig(scheme)
    return rtn.quantize(weight, config.bits, config.group_for(shape[-1]), torch.bfloat16)


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantized_weight(full, scheme):
    """A QuantizedWeight holding `full` (2-D, or a 3-D stack quantized expert by expert)."""
    weight = QuantizedWeight(tuple(full.shape), QuantizationConfig(scheme), torch.bfloat16, "cuda")
    if full.dim() == 2:
        weight.write((), full)
    for index in range(full.shape[0]) if full.dim() == 3 else []:
        weight.write((index,), full[index])
    return weight


def expert_stacks(variant, schemes):
    """{"bf16": [gate_up, down], scheme: the two quantized}: random stacks of the variant's routed
    experts and its two shared ones."""
    E, I, h = EXPERTS[variant]
    stacks = {"bf16": [torch.randn(E + 2, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02,
                       torch.randn(E + 2, h, I, device="cuda", dtype=torch.bfloat16) * 0.02]}
    for scheme in schemes:
        stacks[scheme] = [quantized_weight(full, scheme) for full in stacks["bf16"]]
    return stacks


def token_pairs(E, tokens):
    """[tokens, 8] expert ids: 6 distinct random routed experts of E a token, then the shared E and E + 1."""
    routed = torch.stack([torch.randperm(E, device="cuda")[:6] for _ in range(tokens)])
    return torch.cat([routed, torch.tensor([E, E + 1], device="cuda").expand(tokens, 2)], dim=1)


def sweep(make_run, copies, valid):
    """(us of the default tiles, [(us, config)] fastest first) for a `make_run(copy, config)`."""
    default = graph_us(lambda i: make_run(i, (None, None, None, 1)), copies)
    timings = sorted((graph_us(lambda i: make_run(i, c), copies), c) for c in CONFIGS if valid(c))
    return default, timings


def record(results, name, moved, default, timings, reference_us, reference_name):
    best_us, best = timings[0]
    entry = dict(name=name, bytes=moved, default_us=default, default_gb_s=moved / default / 1e3, best_us=best_us,
                 best_config=best, best_gb_s=moved / best_us / 1e3, next=[(t, c) for t, c in timings[1:6]],
                 reference=reference_name, reference_us=reference_us, speedup_vs_reference=reference_us / best_us)
    results.append(entry)
    print(f"{name}: default {default:.1f} us ({entry['default_gb_s']:.0f} GB/s) | best {best_us:.1f} us "
          f"({entry['best_gb_s']:.0f} GB/s) at {best} (block_n, block_k, warps, stages) | {reference_name} "
          f"{reference_us:.1f} us: x{entry['speedup_vs_reference']:.2f} | next "
          + ", ".join(f"{t:.1f}@{c}" for t, c in timings[1:4]), flush=True)


def experts(results, variants, schemes, rows_list):
    for variant, scheme, rows in itertools.product(variants, schemes, rows_list):
        E, I, h = EXPERTS[variant]
        q13, s13, z13 = quantized((E + 2, 2 * I, h), scheme)
        q2, s2, z2 = quantized((E + 2, h, I), scheme)
        w13 = torch.randn(E + 2, 2 * I, h, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E + 2, h, I, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        n = 8  # id sets cycled over: each expert read about once per cycle
        ids = [torch.randperm(E + 2, device="cuda")[:EXPERTS_PER_TOKEN].repeat(rows) for _ in range(n)]
        act = quant_gemv.gemv_launch(x, q13, s13, z13, ids[0], EXPERTS_PER_TOKEN, True)
        pairs = len(ids[0])
        distinct = len(set(ids[0].tolist()))
        for stage, q, s, z, w, inp, per_id, silu in (("gate_up", q13, s13, z13, w13, x, EXPERTS_PER_TOKEN, True),
                                                     ("down", q2, s2, z2, w2, act, 1, False)):
            per_expert = nbytes(q, s, z) // (E + 2)
            default, timings = sweep(
                lambda i, c: lambda: quant_gemv.gemv_launch(inp, q, s, z, ids[i], per_id, silu, *c), n,
                lambda c: fits(scheme, c))
            reference = graph_us(lambda i: lambda: bf16_gemv._gemv_launch(inp, w, ids[i], per_id, silu), n)
            record(results, f"{variant} experts {stage} {scheme} rows={rows} ({pairs} pairs)", distinct * per_expert,
                   default, timings, reference, "bf16 expert gemv")


def projections(results, variants, schemes, rows_list):
    shapes = [(name, shape) for name, shape in PROJECTIONS.items() if name.split()[0] in variants]
    for (name, (N, K)), scheme, rows in itertools.product(shapes, schemes, rows_list):
        copies = copies_for(N * K * 2)
        weights = [quantized((N, K), scheme) for _ in range(copies_for(N * K // (1 if scheme == "int8" else 2)))]
        dense = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        default, timings = sweep(lambda i, c: lambda: quant_gemv.gemv_launch(x, *weights[i % len(weights)], None, 1,
                                                                             False, *c), len(weights),
                                 lambda c: fits(scheme, c))
        cublas = graph_us(lambda i: lambda: torch.nn.functional.linear(x, dense[i]), copies)
        record(results, f"{name} {scheme} rows={rows}", nbytes(*weights[0]), default, timings, cublas, "cuBLAS bf16")


def dequantize(results, variants, schemes):
    """The prefill's dequantization of one layer's expert stacks (the scratch its GEMMs read)."""
    for variant, scheme in itertools.product(variants, schemes):
        E, I, h = EXPERTS[variant]
        for stage, shape in (("gate_up", (E + 2, 2 * I, h)), ("down", (E + 2, h, I))):
            q, s, z = quantized(shape, scheme)
            us = graph_us(lambda i: lambda: quant_gemv.dequantize(q, s, z, torch.bfloat16), 1, calls=8)
            moved = nbytes(q, s, z) + q.shape[0] * shape[1] * shape[2] * 2
            results.append(dict(name=f"{variant} dequantize {stage} {scheme}", us=us, gb_s=moved / us / 1e3))
            print(f"{variant} dequantize {stage} {scheme}: {us:.0f} us ({moved / us / 1e3:.0f} GB/s read + written)",
                  flush=True)


def prefill_moe(results, variants, schemes, tokens_list=(2054,)):
    """One MoE layer of a prefill of each of `tokens_list` tokens through dispatch.experts: bf16 stacks,
    quantized ones (the grouped GEMM that dequantizes tile by tile), and quantized ones dequantized a
    stack at a time into a bf16 scratch for the bf16 grouped GEMMs (dispatch's other path, forced
    here at every length); then the grouped GEMM's tiles on the gate/up stack at the last length."""
    from deepseek_vl2.kernels import dispatch

    for variant in variants:
        E, I, h = EXPERTS[variant]
        stacks = expert_stacks(variant, schemes)
        for tokens in tokens_list:
            x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
            ids = token_pairs(E, tokens)
            weights = torch.rand(tokens, 8, device="cuda")
            paths = {"bf16": lambda: dispatch.experts(x, *stacks["bf16"], ids, weights)}
            for scheme in schemes:
                for name, rows in ((scheme, None), (f"{scheme} dequantized", 0)):
                    paths[name] = lambda stack=stacks[scheme], rows=rows: within(
                        dispatch.stack_dequantize_rows(rows), lambda: dispatch.experts(x, *stack, ids, weights))
            times = {name: event_ms(run) for name, run in paths.items()}
            results.append(dict(name=f"{variant} prefill MoE layer, {tokens} tokens", ms=times))
            print(f"{variant} prefill MoE layer ({tokens} tokens): " + ", ".join(
                f"{k} {v:.3f} ms (x{v / times['bf16']:.2f})" for k, v in times.items()), flush=True)
        # the grouped GEMM's tiles (quant_grouped_gemm.gemm_tiles) on the gate/up stack
        flat = ids.flatten()
        rows = x[flat.argsort(stable=True) // 8]
        ends = torch.bincount(flat, minlength=E + 2).cumsum(0).to(torch.int32)
        for scheme in schemes:
            gate_up = stacks[scheme][0]
            tiles = [None] + list(itertools.product((64, 128), (64, 128, 256), (4, 8), (2, 3, 4)))
            timed = []
            for tile in tiles:
                block_m = quant_grouped_gemm.block_rows(scheme == "int4", rows.shape[0], E + 2) if tile is None \
                    else tile[0]
                args = (rows, gate_up.qweight, gate_up.scale, gate_up.zero, ends, block_m)
                launch = (lambda args=args: quant_grouped_gemm.grouped_gemm_launch(*args)) if tile is None \
                    else (lambda args=args, tile=tile: quant_grouped_gemm.grouped_gemm_launch(
                        *args, tile[1], None, tile[2], tile[3]))
                try:
                    timed.append((event_ms(launch), tile or "default"))
                except Exception as error:  # noqa: BLE001  (a tile that does not fit the shared memory)
                    print(f"  tile {tile}: {type(error).__name__}", flush=True)
            default = next(t for t, c in timed if c == "default")
            timed.sort(key=lambda tc: tc[0])
            results.append(dict(name=f"{variant} grouped gemm gate_up {scheme}", default_ms=default, best=timed[:6]))
            print(f"{variant} grouped gemm gate_up {scheme}: default {default:.3f} ms | best "
                  + ", ".join(f"{t:.3f}@{c}" for t, c in timed[:4]) + " (block_m, block_n, warps, stages)", flush=True)


def grouped_rows(results, variants, schemes, tokens_list):
    """The quantized grouped GEMM, weight tile first (16-row programs) and rows first, by token count."""
    for variant in variants:
        E = EXPERTS[variant][0]
        stacks = expert_stacks(variant, schemes)
        full = stacks["bf16"]
        for tokens in tokens_list:
            ids = token_pairs(E, tokens).flatten()
            ends = torch.bincount(ids, minlength=E + 2).cumsum(0).to(torch.int32)
            pairs = ids.numel()
            for gemm, index in (("gate/up", 0), ("down", 1)):
                rows = torch.randn(pairs, full[index].shape[-1], device="cuda", dtype=torch.bfloat16)
                times = {"bf16": event_ms(lambda: torch._grouped_mm(rows, full[index].transpose(1, 2), offs=ends))}
                for scheme in schemes:
                    qw = stacks[scheme][index]
                    for name, block_m in (("weights first", 16), ("rows first", 128 if scheme == "int4" else 64)):
                        times[f"{scheme} {name}"] = event_ms(lambda: quant_grouped_gemm.grouped_gemm_launch(
                            rows, qw.qweight, qw.scale, qw.zero, ends, block_m))
                results.append(dict(name=f"{variant} grouped {gemm}, {tokens} tokens", pairs_per_expert=pairs / (E + 2),
                                    ms=times))
                print(f"{variant} grouped {gemm}, {tokens} tokens ({pairs / (E + 2):.1f} pairs an expert): "
                      + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()), flush=True)


def within(context, run):
    """run() inside `context` (one of dispatch's limit settings, made afresh for each call, as lambdas
    cannot hold a with block)."""
    with context:
        return run()


@contextlib.contextmanager
def linear_rows(gemv_rows: int, tile_rows: int):
    """dispatch's linear layers through the gemv up to `gemv_rows`, the dense tiles up to `tile_rows`."""
    from deepseek_vl2.kernels import dispatch

    with dispatch.quant_gemv_rows(gemv_rows, gemv_rows), dispatch.quant_linear_tile_rows(tile_rows):
        yield


def decode_rows(results, variants, schemes, rows_list):
    """One decode step's experts and projections at `rows` token rows: quantized through each path
    (experts: the gemv, the scanning GEMM, the sorted grouped GEMM; projections: linear_layer_paths),
    and bf16, per call in a graph."""
    from deepseek_vl2.kernels import dispatch

    for variant, rows in itertools.product(variants, rows_list):
        E, I, h = EXPERTS[variant]
        stacks = expert_stacks(variant, schemes)
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        routings = 8  # one per call of a cycle: the experts a call reads are mostly not in L2 yet
        ids = [token_pairs(E, rows) for _ in range(routings)]
        weights = torch.rand(rows, 8, device="cuda")
        times = {"bf16": graph_us(lambda i: lambda: dispatch.experts(x, *stacks["bf16"], ids[i], weights), routings)}
        for scheme in schemes:
            for path, gemv_rows, scan_rows in (("gemv", 10**6, 0), ("scan", 0, 10**6), ("grouped", 0, 0)):
                times[f"{scheme} {path}"] = graph_us(lambda i, limits=(gemv_rows, scan_rows), scheme=scheme: lambda: within(
                    dispatch.quant_expert_rows(*limits), lambda: dispatch.experts(x, *stacks[scheme], ids[i], weights)), routings)
        results.append(dict(name=f"{variant} experts rows={rows}", us=times))
        print(f"{variant} experts, {rows} rows: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()), flush=True)
        for name, (N, K) in PROJECTIONS.items():
            if name.split()[0] != variant:
                continue
            _, _, times = linear_layer_paths(N, K, rows, schemes)
            results.append(dict(name=f"{name} rows={rows}", us=times))
            print(f"{name}, {rows} rows: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()), flush=True)


def linear_layer_paths(N: int, K: int, rows: int, schemes):
    """`rows` token rows through a linear layer [N, K] by each path dispatch.quantized_linear can take
    (the gemv, the dense tiles, the dequantized weight with cuBLAS), beside cuBLAS on bf16; per call in
    a graph, weights from HBM, as in a step that reads every layer once. Returns (x, {scheme: the
    quantized weight's copies}, {path: us})."""
    from deepseek_vl2.kernels import dispatch

    copies = copies_for(N * K * 2)
    dense = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    times = {"bf16": graph_us(lambda i: lambda: torch.nn.functional.linear(x, dense[i]), copies)}
    quantized = {}
    for scheme in schemes:
        q = quantized[scheme] = [quantized_weight(weight, scheme) for weight in dense]
        for path, gemv_rows, tile_rows in (("gemv", 10**6, 0), ("dense tiles", 0, 10**6), ("dequantized", 0, 0)):
            times[f"{scheme} {path}"] = graph_us(lambda i, gemv_rows=gemv_rows, tile_rows=tile_rows, q=q: lambda: within(
                linear_rows(gemv_rows, tile_rows), lambda: dispatch.quantized_linear(x, q[i], None)), copies)
    return x, quantized, times


DENSE_CONFIGS = list(itertools.product((16, 32, 64), (2, 4), (3, 4)))  # (block_n, warps, stages)


def dense_rows(results, variants, schemes, rows_list):
    """A decode batch's rows through each quantized linear layer by each path (linear_layer_paths:
    the dense tiles there with their default tiles), and the best of DENSE_CONFIGS for the dense
    tiles (int8 also at 256 columns a tile)."""
    for (name, (N, K)), rows in itertools.product(PROJECTIONS.items(), rows_list):
        if name.split()[0] not in variants:
            continue
        x, quantized, times = linear_layer_paths(N, K, rows, schemes)
        for scheme, q in quantized.items():
            tiles = {}
            for config in DENSE_CONFIGS + ([] if scheme == "int4" else [(n, w, st, 256) for n, w, st in DENSE_CONFIGS]):
                block_n, warps, stages, *columns = config
                tiles[config] = graph_us(lambda i, q=q, tile=(block_n, columns[0] if columns else 128, warps, stages):
                                         lambda: quant_grouped_gemm.grouped_gemm_launch(
                                             x, q[i].qweight, q[i].scale, q[i].zero, None, 16, *tile), len(q))
            best = min((t, c) for c, t in tiles.items())
            times[f"{scheme} dense tiles, best"] = best[0]
            times[f"{scheme} dense best tile"] = best[1]
        results.append(dict(name=f"{name} rows={rows}", us=times))
        print(f"{name}, {rows} rows: " + ", ".join(f"{k} {v:.1f} us" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in times.items()), flush=True)


def event_ms(run, warmup=2, repeats=10) -> float:
    """Mean milliseconds of `run()` between CUDA events."""
    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["experts", "projections", "dequantize", "prefill", "decode-rows",
                                           "grouped-rows", "dense-rows"])
    parser.add_argument("--schemes", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--variants", nargs="+", default=list(EXPERTS), choices=list(EXPERTS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1], help="token rows of the gemv")
    parser.add_argument("--prefill-tokens", nargs="+", type=int, default=[2054],
                        help="prompt lengths of --only prefill's MoE layer (the tiles are swept at the last)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "quant_gemv_configs.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    started = time.time()
    with torch.inference_mode():
        if args.only in (None, "experts"):
            experts(results, args.variants, args.schemes, args.rows)
        if args.only in (None, "projections"):
            projections(results, args.variants, args.schemes, args.rows)
        if args.only in (None, "dequantize"):
            dequantize(results, args.variants, args.schemes)
        if args.only in (None, "prefill"):
            prefill_moe(results, args.variants, args.schemes, args.prefill_tokens)
        if args.only == "decode-rows":
            decode_rows(results, args.variants, args.schemes, args.rows)
        if args.only == "grouped-rows":
            grouped_rows(results, args.variants, args.schemes, args.rows)
        if args.only == "dense-rows":
            dense_rows(results, args.variants, args.schemes, args.rows)
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  seconds=time.time() - started, command=" ".join(sys.argv))
    Path(args.out).write_text(json.dumps(dict(header, results=results), indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
