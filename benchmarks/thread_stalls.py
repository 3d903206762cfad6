"""How long the server's per-request work keeps another thread of the process from running.

    python benchmarks/thread_stalls.py [--seconds 2] [--threads 1] [--tower]

The continuous engine's thread must run the moment a decode step's tokens are ready; every
millisecond it waits is added to the gap between two streamed tokens. This script runs each stage
of a request's preparation (what the server does off the engine's thread: the JSON body, the data:
URL, the JPEG, the processor, the host tensors the engine copies) over and over on a worker thread,
while a watcher thread sleeps 200 us at a time and records how late it wakes. Twice:

* shared: both threads free to run on any core, as the server's threads are;
* apart: watcher and worker pinned to two different cores (Linux), so the only thing that can hold
  the watcher back is the interpreter lock.

A stage that delays the watcher when shared but not apart delays it through the kernel's choice of
core (the woken thread queued behind the busy one), not through the lock. Prints, per stage, the
median wall time and the watcher's lateness (p50, p99, p99.9, ms). The bench request: a 1024x1024
JPEG and a question (serve_bench.py's), the tiny offline tokenizer, torch's `--threads`.
With `--tower` (CUDA), the stages are instead the prefill thread's vision tower over one prompt's
tiles, eagerly and from its CUDA graphs (engine/tower_graphs.py).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from deepseek_vl2.engine import chat_conversation  # noqa: E402
from deepseek_vl2.engine.chat_engine import prepare_sample  # noqa: E402
from deepseek_vl2.models import DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.offline_checkpoint import make_offline_checkpoint  # noqa: E402
from deepseek_vl2.serve.media import MediaLoader, decode_data_url  # noqa: E402
from serve_bench import image_url, request_body  # noqa: E402

WATCH_SLEEP_S = 0.0002
WORKER_PAUSE_S = 0.002  # between two runs of a stage, as between two requests' stages


def stages(processor):
    """(name, function) for each stage of one request, in the server's order."""
    url = image_url()
    body = request_body(url)
    encoded = decode_data_url(url, "image")
    media = MediaLoader(None, False, max_image_pixels=64_000_000, max_bytes=64 << 20)
    image = media.decode(encoded, "image")
    text = json.loads(body)["messages"][0]["content"][1]["text"]
    conversation = chat_conversation([{"role": "user", "content": text, "images": [image]}])
    sample = prepare_sample(processor, conversation, [image], 1 << 20)

    def host_inputs():  # what ContinuousEngine.host_inputs does for a bfloat16 model
        batch = processor.batchify([sample])
        images = batch.images.to(torch.bfloat16)
        if torch.cuda.is_available():
            images.pin_memory()

    return [
        ("nothing", lambda: None),
        ("json body", lambda: json.loads(body)),
        ("data: URL", lambda: decode_data_url(url, "image")),
        ("JPEG decode", lambda: media.decode(encoded, "image")),
        ("processor", lambda: prepare_sample(processor, conversation, [image], 1 << 20)),
        ("host tensors", host_inputs),
    ]


def tower_stages(tiles: int = 10):
    """(name, function) for the prefill thread's vision tower over one prompt's `tiles` (tiny's real
    shapes, random weights, bf16 on the GPU): launched eagerly, and replayed from TowerGraphs; each
    call waits for the GPU (the wait lets the watcher run, as the prefill thread's waits do). Also the
    GPU memory the graphs hold (MiB) and each way's host time to launch (ms, median of 20)."""
    from types import SimpleNamespace

    from deepseek_vl2.engine.tower_graphs import TowerGraphs
    from deepseek_vl2.modeling.vision import build_vision_tower, tower_features
    from deepseek_vl2.models import DeepseekVLV2Config
    from deepseek_vl2.weights.random_init import init_random_weights

    config = DeepseekVLV2Config.from_pretrained(str(REPO / "tests" / "fixtures" / "real_shapes" / "tiny"))
    tower = init_random_weights(build_vision_tower(config.vision_config).to("cuda", torch.bfloat16)).eval()
    images = torch.randn(tiles, 3, config.vision_config.image_size, config.vision_config.image_size,
                         device="cuda").clamp(-1, 1).to(torch.bfloat16)

    def reserved():  # what the allocator holds, without the cache of freed blocks
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    held = reserved()
    graphs = TowerGraphs(SimpleNamespace(vision=tower), tiles)
    graphs.capture_all(torch.cuda.Stream())
    held = (reserved() - held) / 2**20

    def eager():
        with torch.inference_mode():
            tower_features(tower, images)

    def replayed():
        with torch.inference_mode():
            graphs(images)

    launch = {}
    for name, launch_once in (("eager", eager), ("graphs", replayed)):
        times = []
        for _ in range(21):
            torch.cuda.synchronize()
            start = time.perf_counter()
            launch_once()
            times.append(time.perf_counter() - start)
        launch[name] = 1e3 * statistics.median(times[1:])

    def waited(fn):
        return lambda: (fn(), torch.cuda.synchronize())

    return [(f"vision tower, {tiles} tiles, eager", waited(eager)),
            (f"vision tower, {tiles} tiles, graphs", waited(replayed))], held, launch


def lateness(stage, seconds: float, apart: bool):
    """The stage's median wall time and the watcher's wake-up lateness, sorted (seconds)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if apart and len(cores) < 2:
        return None
    stop = threading.Event()
    walls, late = [], []

    def work():
        if apart:
            os.sched_setaffinity(0, {cores[1]})
        while not stop.is_set():
            start = time.perf_counter()
            stage()
            walls.append(time.perf_counter() - start)
            time.sleep(WORKER_PAUSE_S)

    def watch():
        if apart:
            os.sched_setaffinity(0, {cores[0]})
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            time.sleep(WATCH_SLEEP_S)
            late.append(time.perf_counter() - start - WATCH_SLEEP_S)

    worker, watcher = threading.Thread(target=work), threading.Thread(target=watch)
    worker.start()
    watcher.start()
    watcher.join()
    stop.set()
    worker.join()
    return statistics.median(walls), sorted(late)


def quantile_ms(values, q: float) -> float:
    return 1e3 * values[min(len(values) - 1, int(q * len(values)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per stage and placement")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--tower", action="store_true", help="the prefill thread's vision tower (CUDA) instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(Path(tmp) / "ckpt")))
    print(f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, torch "
          f"{torch.__version__} ({args.threads} intra-op threads), switch interval {sys.getswitchinterval() * 1e3:g} ms; "
          f"watcher lateness in ms")
    if args.tower:
        stage_list, held, launch = tower_stages()
        print(f"tower graphs hold {held:.0f} MiB of GPU memory; host time to launch: eager {launch['eager']:.2f} ms, "
              f"graphs {launch['graphs']:.2f} ms")
    else:
        stage_list = stages(processor)
    print("| stage | wall ms | shared p50 / p99 / p99.9 | apart p50 / p99 / p99.9 |\n|---|---|---|---|")
    for name, stage in stage_list:
        cells = []
        for apart in (False, True):
            measured = lateness(stage, args.seconds, apart)
            if measured is None:
                cells.append("(one core)")
                continue
            wall, late = measured
            cells.append(" / ".join(f"{quantile_ms(late, q):.2f}" for q in (0.5, 0.99, 0.999)))
        print(f"| {name} | {1e3 * wall:.2f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
