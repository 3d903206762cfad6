"""Profile one decode step of the GPU fast path at the real shapes (random weights).

    python benchmarks/profile_decode.py --variant tiny --batch 1 [--quantization int4]

Prints the wall time of a replayed step, the GPU kernel time inside it (so the rest is launch
gaps and idle), and the kernels that cost most; with --host-top, the host ops that cost most.
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench import SCHEMES, build_model
from deepseek_vl2.generation.cuda_graphs import decoder_for


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=2054)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--prefill", action="store_true", help="profile the prompt forward instead")
    parser.add_argument("--host-top", type=int, default=0, help="also list the host (CPU) ops that cost most")
    parser.add_argument("--in-order", type=int, default=0, metavar="N",
                        help="also list the first N kernels of one step in the order they ran, with their times")
    parser.add_argument("--quantization", default="none", choices=SCHEMES,
                        help="the decoder's linear layers (+head: and the LM head) quantized while the model is built")
    args = parser.parse_args()
    model = build_model(args.variant, quantization=args.quantization)
    lm = model.language
    B, T = args.batch, args.context
    with torch.inference_mode():
        decoder = decoder_for(lm, B)
        mask = torch.ones(B, T + 256, dtype=torch.bool, device="cuda")
        cache = decoder.start(mask)
        embeds = torch.randn(B, T, lm.config.hidden_size, device="cuda", dtype=lm.dtype) * 0.02
        positions = torch.arange(T, device="cuda").expand(B, T)
        lm(inputs_embeds=embeds, attention_mask=mask[:, :T], position_ids=positions, past_key_values=cache,
           logits_to_keep=1)
        tokens = torch.zeros(B, dtype=torch.long, device="cuda")
        pos = torch.full((B,), T, device="cuda")

        def one(i):
            if args.prefill:
                cache.length = 0
                lm(inputs_embeds=embeds, attention_mask=mask[:, :T], position_ids=positions, past_key_values=cache,
                   logits_to_keep=1)
            else:
                decoder.step(tokens, pos, T + i)

        for i in range(3):  # capture + warm-up
            one(i)
        torch.cuda.synchronize()
        walls = []
        for i in range(args.steps):
            start = time.perf_counter()
            one(3 + i)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                one(3 + i)
            torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += event.device_time_total
            entry[1] += 1
    kernel_us = sum(v[0] for v in kernels.values()) / args.steps
    launches = sum(v[1] for v in kernels.values()) / args.steps
    wall_us = statistics.median(walls) * 1e6
    what = "prefill" if args.prefill else "decode step"
    print(f"{args.variant} ({args.quantization}) batch {B} context {T} {what}: wall {wall_us:.0f} us (synchronised, median), "
          f"GPU kernel time {kernel_us:.0f} us in {launches:.0f} kernels, "
          f"gaps/idle {wall_us - kernel_us:.0f} us ({100 * (1 - kernel_us / wall_us):.0f}%)")
    print(f"{'us/step':>9} {'n/step':>7}  kernel")
    for name, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{total / args.steps:9.1f} {count / args.steps:7.1f}  {name[:110]}")
    if args.in_order:
        print_in_order(prof, args.steps, args.in_order)
    if args.host_top:
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.host_top]
        print(f"host time per step: {sum(e.self_cpu_time_total for e in prof.key_averages()) / args.steps:.0f} us "
              "(under the profiler, which adds its own)")
        print(f"{'self us':>9} {'n/step':>7}  host op")
        for e in ops:
            print(f"{e.self_cpu_time_total / args.steps:9.1f} {e.count / args.steps:7.1f}  {e.key[:110]}")


def print_in_order(prof, steps: int, count: int) -> None:
    """The first `count` kernels of the profile's last step, in the order they started: each one's
    time and the idle time before it (the gap after the kernel before it ended)."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_step = len(events) // steps
    step = events[len(events) - per_step:]
    print(f"one step in order ({per_step} kernels; the first {count}):")
    print(f"{'us':>7} {'gap us':>7}  kernel")
    previous_end = None
    for event in step[:count]:
        gap = 0.0 if previous_end is None else event.time_range.start - previous_end
        print(f"{event.time_range.elapsed_us():7.2f} {gap:7.2f}  {event.name[:110]}")
        previous_end = event.time_range.end


if __name__ == "__main__":
    main()
