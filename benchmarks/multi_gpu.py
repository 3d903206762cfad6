"""A DeepSeek-VL2 model spread over the visible GPUs by `device_map`, checked against one GPU.

    python benchmarks/multi_gpu.py --out multi_gpu.json                 # small, 18GiB per GPU, "auto"
    python benchmarks/multi_gpu.py --variant tiny --max-memory 5GiB --device-map balanced

1. Random bf16 weights (fixed seed) at the release's real shapes are made on GPU 0 and saved as
   an official-format checkpoint in a temporary directory (~30 GiB for small; `--tmp` picks where).
2. That in-memory model is the one-GPU reference: greedy `generate` of `--new-tokens` tokens on
   bench.py's prompt (a 1024x1024 image, 2054 tokens), on the plain path (`cuda_graphs = False`:
   the kernels a split model runs; the CUDA-graph path is checked against it in test_cuda.py).
   Then it is freed.
3. The checkpoint is loaded with `from_pretrained(device_map=..., max_memory={i: --max-memory for
   each GPU})`. Printed and written to `--out` (JSON): the placement (per device: modules and
   GiB of weights), whether each device is within its budget, peak memory per GPU, the same
   generate on the split model, and the comparison: equal tokens, or the first difference with
   the reference's top-2 logit margin there and the logit noise between the runs before it (a
   difference only at a near-tie, margin <= 2 x noise, is accepted and recorded).

Exit status 1 when the model was not split over at least two GPUs, a budget is exceeded, or the
tokens differ other than at a near-tie.
"""
import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import CONFIGS, make_prompt  # noqa: E402
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.offline_checkpoint import make_offline_checkpoint  # noqa: E402
from deepseek_vl2.weights.placement import describe_placement  # noqa: E402
from deepseek_vl2.weights.random_init import init_random_weights  # noqa: E402

GiB = 2**30
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


def gpu_memory() -> dict:
    return {f"cuda:{i}": dict(allocated_gib=round(torch.cuda.memory_allocated(i) / GiB, 3),
                              peak_gib=round(torch.cuda.max_memory_allocated(i) / GiB, 3))
            for i in range(torch.cuda.device_count())}


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def greedy(model, batch, new_tokens: int):
    """Greedy tokens and per-step scores (plain path) of a second run, the seconds it took (the
    first run pays for kernel compilation), and whether both runs chose the same tokens."""
    model.language.cuda_graphs = False
    runs = []
    for _ in range(2):
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        runs.append((out, time.perf_counter() - start))
    (first, _), (out, seconds) = runs
    T = batch["input_ids"].shape[1]
    repeatable = torch.equal(first.sequences, out.sequences)
    return out.sequences[0, T:].tolist(), [s[0].float().cpu() for s in out.scores], seconds, repeatable


def compare(ref_tokens, ref_scores, tokens, scores) -> dict:
    """Equal tokens, or the first difference with the reference's top-2 margin there and the largest
    logit difference over the steps up to it (same tokens fed so far, so it is rounding noise)."""
    diff_at = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    checked = len(ref_tokens) if diff_at is None else diff_at + 1
    noise = 0.0
    for i in range(checked):
        both = torch.isfinite(ref_scores[i]) & torch.isfinite(scores[i])
        noise = max(noise, (ref_scores[i][both] - scores[i][both]).abs().max().item())
    result = dict(tokens_equal=diff_at is None and len(ref_tokens) == len(tokens), max_logit_diff=noise)
    if diff_at is not None:
        top = ref_scores[diff_at].topk(2)
        margin = (top.values[0] - top.values[1]).item()
        result["first_difference"] = dict(step=diff_at, reference_token=ref_tokens[diff_at], split_token=tokens[diff_at],
                                          reference_top2=top.indices.tolist(), reference_margin=margin,
                                          noise=noise, near_tie=margin <= 2 * noise)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--max-memory", default="18GiB", help="weight budget per GPU (accelerate's max_memory)")
    parser.add_argument("--cpu-memory", default=None, help="also allow this much CPU offload (e.g. 64GiB)")
    parser.add_argument("--device-map", default="auto", choices=["auto", "balanced", "balanced_low_0", "sequential"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="directory for the temporary checkpoint (default: the system's)")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        sys.exit(f"multi_gpu.py needs at least 2 CUDA GPUs; {gpus} visible")
    result = {}
    try:
        failures = run(args, gpus, result)
    except Exception:  # noqa: BLE001  (keep what was measured, with the error, for diagnosis)
        result["error"] = traceback.format_exc()
        result["memory_at_error"] = gpu_memory()
        log(result["error"])
        failures = ["error: " + result["error"].strip().splitlines()[-1]]
    result["failures"] = failures
    result["total_s"] = time.perf_counter() - STARTED
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.out}")
    log("OK" if not failures else "FAILED: " + "; ".join(failures))
    sys.exit(1 if failures else 0)


def run(args, gpus: int, result: dict) -> list:
    """The measurements (into `result`); returns the failed checks."""
    max_memory = {i: args.max_memory for i in range(gpus)}
    if args.cpu_memory:
        max_memory["cpu"] = args.cpu_memory
    result.update(variant=args.variant, gpus=[torch.cuda.get_device_name(i) for i in range(gpus)],
                  torch=torch.__version__, device_map=args.device_map, max_memory=dict(max_memory),
                  new_tokens=args.new_tokens, seed=args.seed, command=" ".join(sys.argv))
    log(f"{gpus} GPUs: {result['gpus']}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(tmp / "processor")))
        conversation, images = make_prompt(processor)
        batch = processor(conversations=conversation, images=images, force_batchify=True)
        result["prompt_tokens"] = int(batch.input_ids.shape[1])

        # 1-2: random weights on GPU 0, saved; the one-GPU reference run
        config = DeepseekVLV2Config.from_pretrained(str(CONFIGS / args.variant))
        with torch.device("meta"):
            model = DeepseekVLV2ForCausalLM(config)
        model = init_random_weights(model.to(torch.bfloat16).to_empty(device="cuda:0"), seed=args.seed).eval()
        log(f"random {args.variant} weights on cuda:0: {torch.cuda.memory_allocated(0) / GiB:.2f} GiB")
        checkpoint = tmp / "checkpoint"
        model.save_pretrained(checkpoint)
        log(f"saved the checkpoint: {sum(f.stat().st_size for f in checkpoint.iterdir()) / GiB:.2f} GiB in {checkpoint}")
        batch = batch.to("cuda:0", dtype=torch.bfloat16)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask",
                                        "images_spatial_crop")}
        reset_peaks()
        ref_tokens, ref_scores, ref_s, repeatable = greedy(model, inputs, args.new_tokens)
        result["single_gpu"] = dict(tokens=ref_tokens, generate_s=ref_s, repeatable=repeatable, memory=gpu_memory())
        log(f"one GPU: {args.new_tokens} tokens in {ref_s:.2f} s; peak {gpu_memory()['cuda:0']['peak_gib']} GiB")
        del model
        gc.collect()
        torch.cuda.empty_cache()

        # 3: the split model from the checkpoint
        reset_peaks()
        start = time.perf_counter()
        split = DeepseekVLV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16,
                                                        device_map=args.device_map, max_memory=dict(max_memory),
                                                        progress=False)
        result["load_s"] = time.perf_counter() - start
    placement = describe_placement(split)
    result["placement"] = {device: dict(gib=round(e["gib"], 3), modules=e["modules"]) for device, e in placement.items()}
    result["hf_device_map"] = getattr(split, "hf_device_map", None)
    budget = {f"cuda:{i}": convert_file_size_to_int(args.max_memory) / GiB for i in range(gpus)}
    if args.cpu_memory:
        budget["cpu"] = convert_file_size_to_int(args.cpu_memory) / GiB
    result["within_budget"] = {d: e["gib"] <= budget[d] for d, e in placement.items()}
    result["split_over_gpus"] = sorted(d for d in placement if d.startswith("cuda"))
    log(f"loaded with device_map={args.device_map!r}, max_memory={max_memory} in {result['load_s']:.1f} s; "
        f"is_split={split.language.is_split}")
    for device, e in placement.items():
        log(f"  {device}: {e['gib']:.2f} GiB (budget {budget[device]:.1f}): {compress(e['modules'])}")
    result["split_memory_after_load"] = gpu_memory()

    ref_inputs = {k: v.to(split.device) for k, v in inputs.items()}
    tokens, scores, split_s, repeatable = greedy(split, ref_inputs, args.new_tokens)
    result["split"] = dict(tokens=tokens, generate_s=split_s, repeatable=repeatable, memory=gpu_memory())
    log(f"split: {args.new_tokens} tokens in {split_s:.2f} s; peak per GPU "
        f"{ {d: m['peak_gib'] for d, m in result['split']['memory'].items()} } GiB")
    result["comparison"] = compare(ref_tokens, ref_scores, tokens, scores)
    log(f"comparison: {result['comparison']}")
    log(f"reference tokens: {ref_tokens}")
    if not result["comparison"]["tokens_equal"]:
        log(f"split tokens:     {tokens}")

    failures = []
    if len(result["split_over_gpus"]) < 2:
        failures.append(f"the model was not split over two GPUs: {list(placement)}")
    failures += [f"{d} holds {placement[d]['gib']:.2f} GiB, over its budget" for d, ok in result["within_budget"].items()
                 if not ok]
    difference = result["comparison"].get("first_difference")
    if difference is not None and not difference["near_tie"]:
        failures.append(f"tokens differ at step {difference['step']} where the margin "
                        f"{difference['reference_margin']:.4f} is more than twice the noise {difference['noise']:.4f}")
    return failures


def compress(modules) -> str:
    """'language.model.layers.0' ... 'language.model.layers.12' shown as one range."""
    out, streak = [], []
    for name in modules + [None]:
        prefix, _, index = (name or "").rpartition(".")
        if name is not None and index.isdigit() and streak and streak[-1][0] == prefix and int(index) == streak[-1][1] + 1:
            streak.append((prefix, int(index)))
            continue
        if streak:
            out.append(f"{streak[0][0]}.{streak[0][1]}" + (f"-{streak[-1][1]}" if len(streak) > 1 else ""))
            streak = []
        if name is None:
            break
        if index.isdigit():
            streak = [(prefix, int(index))]
        else:
            out.append(name)
    return ", ".join(out)


if __name__ == "__main__":
    main()
