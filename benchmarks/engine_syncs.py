"""Find where the continuous engine makes the host wait for the GPU, on one CUDA GPU.

    python benchmarks/engine_syncs.py --variant tiny [--requests 6] [--json syncs.json]

A host-device synchronisation in an engine iteration drains the GPU's queue: the host then
launches the next work while the GPU idles, and the one-step-ahead pipelining of the engine
(continuous.py) is lost. This script builds the engine on random weights of the release's shapes
(serve_bench.py's model), submits `--requests` requests (a 1024x1024 image and a question, 16 new
tokens, greedy), drives `engine.step()` on this thread with PyTorch's sync debug mode on, and
reports each synchronising call by the innermost line of deepseek_vl2 it came from, with how many
times it ran and in how many iterations.
"""
import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def package_frame(stack) -> str:
    """The innermost frame of deepseek_vl2's own code, as path:line function."""
    for frame in reversed(stack):
        if "/deepseek_vl2/" in frame.filename:
            return f"{frame.filename.split('/deepseek_vl2/')[-1]}:{frame.lineno} {frame.name}"
    return "outside deepseek_vl2"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", help="write the sites and counts here")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from deepseek_vl2.engine import ContinuousEngine, GenerationParams, PrefillSettings
    from serve_bench import QUESTION, build_chat_engine

    chat = build_chat_engine(args.variant)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=8, prefill=PrefillSettings(chunk=4096))
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    conversation = [{"role": "<|User|>", "content": "<image>\n" + QUESTION}, {"role": "<|Assistant|>", "content": ""}]
    params = GenerationParams(max_new_tokens=args.new_tokens, temperature=0)
    samples = [engine.prepare_one(conversation, [image]) for _ in range(args.requests)]

    def run(record: bool) -> dict:
        handles = [engine.submit(sample, params) for sample in samples]
        sites, iterations, step = collections.Counter(), collections.defaultdict(set), 0
        seen = warnings.showwarning

        def note(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                site = package_frame(traceback.extract_stack()[:-1])
                sites[site] += 1
                iterations[site].add(step)

        warnings.showwarning = note
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn" if record else "default")
        started = time.perf_counter()
        try:
            while engine.has_work():
                engine.step()
                step += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = seen
        seconds = time.perf_counter() - started
        for handle in handles:
            handle.result()  # raises a request's error
        return dict(iterations=step, seconds=round(seconds, 3),
                    sites=[dict(site=s, calls=n, iterations=len(iterations[s])) for s, n in sites.most_common()])

    run(record=False)  # warm-up
    timed = run(record=False)
    found = run(record=True)
    report = dict(variant=args.variant, requests=args.requests, new_tokens=args.new_tokens,
                  seconds_without_check=timed["seconds"], **found)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
