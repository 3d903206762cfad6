"""Time the processor on the CPU: what the server does for each request before the model sees it.

    python benchmarks/processor_time.py [--repeats 20]

The bench prompt (bench.py's 1024x1024 image and question, 3x3 tiles + global view) through
`process_one` (tiling, pixel normalisation, tokenisation) and `batchify`, with the offline
tokenizer. Prints the median milliseconds of each; run it on two trees to compare them. Then
`--requests` requests prepared one after another (as the server did under one lock) and from as
many threads at once (as it does now: only the tokenizer calls take turns): the wall time of each.
"""
import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from deepseek_vl2.models import DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.offline_checkpoint import make_offline_checkpoint  # noqa: E402

QUESTION = "Describe everything you can see in this picture: the objects, their colours and the whole scene."


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(Path(tmp) / "ckpt")))
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    conversation = [{"role": "<|User|>", "content": "<image>\n" + QUESTION}, {"role": "<|Assistant|>", "content": ""}]
    sample = processor.process_one(conversations=conversation, images=[image], system_prompt="")
    one = median_ms(lambda: processor.process_one(conversations=conversation, images=[image], system_prompt=""),
                    args.repeats)
    batch = median_ms(lambda: processor.batchify([sample]), args.repeats)
    print(f"process_one {one:.1f} ms, batchify {batch:.1f} ms ({len(sample)} tokens, "
          f"{sample.images.shape[0]} tiles; median of {args.repeats})")

    def prepare():
        processor.process_one(conversations=conversation, images=[image], system_prompt="")

    def in_threads():
        threads = [threading.Thread(target=prepare) for _ in range(args.requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    one_by_one = median_ms(lambda: [prepare() for _ in range(args.requests)], 5)
    together = median_ms(in_threads, 5)
    print(f"{args.requests} requests: one after another {one_by_one:.0f} ms, from {args.requests} threads "
          f"{together:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
