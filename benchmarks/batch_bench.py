"""Benchmark the batch runner (python -m deepseek_vl2.batch) on CUDA GPUs, with random weights at the
release's shapes.

    python3 benchmarks/batch_bench.py --variant tiny --out $OUT/batch_tiny.json             # one GPU
    python3 benchmarks/batch_bench.py --variant tiny --gpus 2 --out $OUT/batch_tiny_2gpu.json

The dataset: --rows rows, each a 1024x1024 JPEG (16 different images, files on disk) and a question,
128 new tokens, greedy. The model: bench.py's random bf16 weights at the release's shapes, with the
offline tokenizer; LM-head rows of EOS and of ids the tokenizer lacks are zeroed (as serve_bench.py
does), so every answer runs its full 128 tokens in decodable text.

One GPU (default): a plain Python loop over `ChatEngine.chat` (images read with PIL, one row at a
time) on the first --loop-rows rows, against the batch runner (one engine in this process, image
worker threads) over all rows, after a warm-up run. Reported: rows/s and output tok/s of each, the
ratio, and how many of the loop's rows the runner answered with the same text.

--gpus N: the multi-process path over N GPUs against the same path on one GPU (both: engine
processes built first; the clock starts when every engine is ready). Reported: rows/s and output
tok/s of each, the scaling (N GPUs / one), each engine's rows, tokens, busy seconds and decode steps,
and each GPU's utilisation sampled with nvidia-smi while the rows ran.

--model_path and --device run the same measurements on a real checkpoint (a CPU smoke run: the
fixture checkpoint, --device cpu, a few rows).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from deepseek_vl2.batch import EngineRunner, EngineSpec, run_dataset  # noqa: E402
from deepseek_vl2.batch.processes import ProcessSettings, run_processes  # noqa: E402
from deepseek_vl2.batch.rows import run_settings  # noqa: E402

QUESTION = "Describe everything you can see in this picture: the objects, their colours and the whole scene."
NEW_TOKENS = 128
DISTINCT_IMAGES = 16


@dataclass
class RandomSpec(EngineSpec):
    """An engine on serve_bench.py's random-weight model of `variant` (built on the current GPU)."""

    variant: str = "tiny"

    def load(self, device: str):
        import torch

        from serve_bench import build_chat_engine

        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # bench.build_model allocates on "cuda": this GPU
        chat = build_chat_engine(self.variant)
        return chat.processor, chat.model


def make_spec(args) -> EngineSpec:
    if args.model_path:
        return EngineSpec(args.model_path, max_num_seqs=args.slots, chunk_size=args.chunk_size)
    return RandomSpec(f"random {args.variant}", max_num_seqs=args.slots, chunk_size=args.chunk_size,
                      variant=args.variant)


def write_dataset(directory: Path, rows: int, size: int, prefix: str = "row") -> Path:
    """rows.jsonl with `rows` rows over DISTINCT_IMAGES different JPEGs of size x size in `directory`."""
    from PIL import Image, ImageOps

    gradient = Image.radial_gradient("L").resize((size, size))
    for k in range(DISTINCT_IMAGES):
        path = directory / f"image_{k}.jpg"
        if not path.exists():
            tinted = ImageOps.colorize(gradient.rotate(k * 22.5), black=(k * 15, 40, 255 - k * 15), white="white")
            tinted.save(path, quality=90)
    path = directory / f"{prefix}s.jsonl"
    with open(path, "w") as file:
        for index in range(rows):
            file.write(json.dumps({"id": f"{prefix}-{index}", "prompt": QUESTION,
                                   "images": [f"image_{index % DISTINCT_IMAGES}.jpg"]}) + "\n")
    return path


def read_records(path: Path) -> dict:
    return {record["id"]: record for record in map(json.loads, path.read_text().splitlines())}


def throughput(rows: int, tokens: int, seconds: float) -> dict:
    return dict(rows=rows, tokens=tokens, seconds=round(seconds, 3), rows_s=round(rows / seconds, 3),
                tok_s=round(tokens / seconds, 1))


def loop_over_chat(chat, dataset: Path, count: int, new_tokens: int) -> tuple:
    """The plain loop: each row's images read with PIL, then `chat`, one row after the other."""
    from deepseek_vl2.batch.rows import read_rows
    from deepseek_vl2.engine import chat_conversation
    from deepseek_vl2.utils.io import load_pil_images

    rows = [row for row, _ in zip(read_rows(dataset), range(count + 1))]
    params = run_settings(max_new_tokens=new_tokens)

    def answer(row):
        conversation = chat_conversation([{"role": "user", "content": row.prompt, "images": row.images}])
        return chat.chat(conversation, load_pil_images(conversation), params)

    answer(rows[-1])  # warm-up (not timed, not counted)
    started, texts, tokens = time.perf_counter(), {}, 0
    for row in rows[:count]:
        result = answer(row)
        texts[row.id] = result.text
        tokens += len(result.token_ids)
    return throughput(count, tokens, time.perf_counter() - started), texts


def one_gpu(args, spec: EngineSpec, work: Path) -> dict:
    from deepseek_vl2.engine import ChatEngine

    device = args.device or "cuda"
    processor, model = spec.load(device)
    started = time.perf_counter()
    engine = spec.engine_for(model, processor)
    startup_s = time.perf_counter() - started
    defaults = run_settings(max_new_tokens=args.new_tokens)
    dataset = write_dataset(work, args.rows, args.image_size)
    warm = write_dataset(work, 2 * engine.slots.max_num_seqs, args.image_size, prefix="warm")
    loop, loop_texts = loop_over_chat(ChatEngine(model, processor, args.chunk_size), dataset, args.loop_rows,
                                      args.new_tokens)
    print("loop over ChatEngine.chat:", json.dumps(loop), flush=True)
    runner = EngineRunner(engine, defaults, image_workers=args.image_workers)
    sampler = GpuSampler()
    try:
        run_dataset(warm, work / "warm_out.jsonl", runner.run, progress=False)
        with sampler:
            summary = run_dataset(dataset, work / "out.jsonl", runner.run, progress=False)
    finally:
        runner.close()
    batch = dict(throughput(summary.answered, summary.tokens, summary.seconds), errors=summary.errors,
                 engine_startup_s=round(startup_s, 1), engine=engine.startup_summary,
                 max_running=engine.stats.max_running, gpu_utilisation=sampler.summary())
    print("batch runner:", json.dumps(batch), flush=True)
    records = read_records(work / "out.jsonl")
    same = sum(records[row_id].get("text") == text for row_id, text in loop_texts.items())
    return dict(loop=loop, batch=batch, ratio_tok_s=round(batch["tok_s"] / loop["tok_s"], 2),
                ratio_rows_s=round(batch["rows_s"] / loop["rows_s"], 2),
                same_text_as_loop=f"{same} of {len(loop_texts)}")


def processes_run(devices: list, settings: ProcessSettings, dataset: Path, output: Path) -> dict:
    """The rows through engine processes on `devices`; the clock starts when all are ready."""
    ready, all_ready, clock = [], threading.Event(), {}

    def on_ready(report):
        ready.append(report)
        if len(ready) == len(devices):
            all_ready.set()

    def gated(rows):
        if not all_ready.wait(1800):
            raise RuntimeError("the engines were not ready in 30 minutes")
        clock["start"] = time.perf_counter()
        yield from rows

    def execute(rows, emit):
        def timed_emit(row, record):
            clock["end"] = time.perf_counter()
            emit(row, record)
        clock["reports"] = run_processes(devices, settings, gated(rows), timed_emit, on_ready=on_ready)

    sampler = GpuSampler()
    with sampler:
        summary = run_dataset(dataset, output, execute, progress=False)
    return dict(throughput(summary.answered, summary.tokens, clock["end"] - clock["start"]), errors=summary.errors,
                engines=[dict(device=r.device, rows=r.rows, tokens=r.tokens, busy_s=round(r.busy_s, 2),
                              decode_steps=r.decode_steps, max_running=r.max_running, startup=r.startup, error=r.error)
                         for r in clock["reports"]],
                gpu_utilisation=sampler.summary())


def several_gpus(args, spec: EngineSpec, work: Path) -> dict:
    settings = ProcessSettings(spec, run_settings(max_new_tokens=args.new_tokens), image_workers=args.image_workers)
    dataset = write_dataset(work, args.rows, args.image_size)
    if args.device == "cpu":
        devices = ["cpu"] * args.gpus
    else:
        devices = [f"cuda:{i}" for i in range(args.gpus)]
    one = processes_run(devices[:1], settings, dataset, work / "one.jsonl")
    print("one engine:", json.dumps(one), flush=True)
    several = processes_run(devices, settings, dataset, work / "several.jsonl")
    print(f"{len(devices)} engines:", json.dumps(several), flush=True)
    first, second = read_records(work / "one.jsonl"), read_records(work / "several.jsonl")
    same = sum(first[key].get("text") == second[key].get("text") for key in first)
    return dict(one_engine=one, engines=several, scaling_tok_s=round(several["tok_s"] / one["tok_s"], 2),
                same_text=f"{same} of {len(first)}")


class GpuSampler:
    """nvidia-smi's utilisation of every GPU, sampled every 0.5 s while in the `with` block."""

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.samples = {}
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def _run(self):
        while not self._stop.wait(self.period_s):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.strip().splitlines():
                index, value = (part.strip() for part in line.split(","))
                self.samples.setdefault(index, []).append(int(value))

    def summary(self):
        if not self.available:
            return "nvidia-smi not found"
        return {f"gpu {index}": dict(mean_pct=round(sum(v) / len(v), 1), samples=len(v),
                                     busy_fraction=round(sum(x >= 50 for x in v) / len(v), 2))
                for index, v in sorted(self.samples.items()) if v}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--model_path", help="a real checkpoint instead of random weights (e.g. a CPU smoke run)")
    p.add_argument("--device", help="default cuda")
    p.add_argument("--gpus", type=int, default=1, help="> 1: engine processes on N GPUs against one")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--loop-rows", type=int, default=32, help="rows of the ChatEngine.chat loop")
    p.add_argument("--slots", type=int, default=64, help="--max_num_seqs of each engine")
    p.add_argument("--chunk-size", type=int, default=-1)
    p.add_argument("--image-workers", type=int, help="image threads per engine (default: the runner's)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--out", required=True, help="the JSON results")
    args = p.parse_args()

    import torch

    on_cpu = args.device == "cpu"
    header = dict(gpu="cpu" if on_cpu else torch.cuda.get_device_name(), gpus_visible=torch.cuda.device_count(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                  model=args.model_path or f"random {args.variant}", rows=args.rows, new_tokens=args.new_tokens,
                  image_size=args.image_size, slots=args.slots, command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['model']}", flush=True)
    spec = make_spec(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = (several_gpus if args.gpus > 1 else one_gpu)(args, spec, Path(tmp))
    Path(args.out).write_text(json.dumps(dict(header, **results), indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
