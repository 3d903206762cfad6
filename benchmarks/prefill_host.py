"""Whether bench.py's eager prefill waits on the host: for each model, the host time to enqueue one
prefill (no synchronisation), the wall time up to its end (synchronised) and the CUDA-event time,
per repeat, and the number of synchronising CUDA calls a prefill makes (torch's sync debug mode).
Host time close to the wall time means the GPU waits for the launches: the figure is then the
host's speed, not the GPU's. bench.py's random weights at the real shapes, its 2054-token prompt.

    cd benchmarks && python3 prefill_host.py small:none small:int8 small:int4
"""
import sys
import time
import warnings

import torch

from bench import build_model, cuda_prompt_batch, device_header, prefill_logits

REPEATS = 6


def synchronising_calls(run) -> list:
    """The warnings torch's sync debug mode gives for one run() (one per synchronising call)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0] for w in caught]


def host_wall_gpu_ms(run):
    """(host ms to enqueue, wall ms to the end, CUDA-event ms) of one run()."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    run()
    end.record()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0), start.elapsed_time(end)


def measure(variant: str, scheme: str, batch):
    """(synchronising calls, [(host, wall, CUDA-event ms)] per repeat) of one model's prefill."""
    model = build_model(variant, quantization=scheme)
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(**batch)
        positions = torch.arange(embeds.shape[1], device="cuda")[None]
        run = lambda: prefill_logits(model.language, embeds, positions)  # noqa: E731
        for _ in range(2):
            run()
        return synchronising_calls(run), [host_wall_gpu_ms(run) for _ in range(REPEATS)]


def main():
    device_header("prefill_host.py")
    batch = cuda_prompt_batch()
    for spec in sys.argv[1:]:
        variant, scheme = spec.split(":")
        syncs, rows = measure(variant, scheme, batch)
        torch.cuda.empty_cache()
        print(f"{variant} {scheme}: {len(syncs)} synchronising call(s) a prefill")
        print("   host enqueue / wall / CUDA events ms: " + ", ".join(f"{a:.1f}/{b:.1f}/{c:.1f}" for a, b, c in rows),
              flush=True)


if __name__ == "__main__":
    main()
