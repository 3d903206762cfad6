"""The first answer in a fresh process: time to the first token and to a 128-token greedy answer.

    python benchmarks/cold_start.py --variants tiny small --json cold_start.json

For each variant, two fresh Python processes run one after the other over the same compile cache
directories (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, made empty for the first):

  (a) cold   empty compile caches: everything torch.compile and Triton build is built now
  (b) warm   a second process: what (a) left on disk is reused

Each process builds the model at the real shapes with random bf16 weights on the GPU and warms it
up as `from_pretrained` does on a GPU (deepseek_vl2/generation/warmup.py; load and warm-up times are
excluded from the answer and reported apart; `--no-warm-up` measures a model moved to the GPU
without it, as `model.cuda()` after a CPU load gives), then answers the bench prompt (a 1024x1024 image and a question,
2054 tokens) the way `inference.py` does: processor, prepare_inputs_embeds, generate with a
streamer, greedy, 128 new tokens (EOS suppressed so every run makes 128). Reported per process:

  first_token_s   from the processor call to the streamer receiving the first new token
  answer_s        from the processor call to the 128th token (CUDA synchronised)
  then_*          the same answer asked again in the same process (the steady state)
  other_length_*  then a prompt of another length (2041 tokens): what a new shape costs

Python's bytecode cache counts as installed, not as a compile cache: an installed package has its
.pyc files, but a read-only site-packages (as on the lent GPU machines) has none, and then every
process recompiles the source of the hundreds of modules torch.compile imports. So all processes
share one PYTHONPYCACHEPREFIX, filled by an untimed first process with throwaway compile caches.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

NEW_TOKENS = 128
OTHER_LENGTH = 2041  # a prompt length the process has not seen (the same image, a shorter question)


class FirstToken:
    """Streamer that records when the first new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def answer(model, processor, conversation, images):
    import torch

    streamer = FirstToken()
    torch.cuda.synchronize()
    started = time.perf_counter()
    batch = processor(conversations=conversation, images=images, force_batchify=True).to(
        model.device, dtype=model.dtype)
    ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
                         images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         streamer=streamer, eos_token_id=processor.eos_id, pad_token_id=processor.eos_id)
    torch.cuda.synchronize()
    done = time.perf_counter()
    assert ids.shape[1] == batch.input_ids.shape[1] + NEW_TOKENS, ids.shape
    return streamer.first - started, done - started


def child(variant: str, warm: bool) -> dict:
    import torch

    from bench import build_model, make_prompt
    from deepseek_vl2.generation import warmup
    from deepseek_vl2.models import DeepseekVLV2Processor
    from deepseek_vl2.offline_checkpoint import make_offline_checkpoint

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(Path(tmp) / "ckpt")))
    background = warmup.start_background_work(torch.device("cuda")) if warm else None  # as from_pretrained
    model = build_model(variant, compile_at_once=False)  # the library's default policy
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    if warm:
        background.join()
        warmup.warm_up(model)
    warm_up_s = time.perf_counter() - started
    conversation, images = make_prompt(processor)
    profile_to = os.environ.get("COLD_START_PROFILE")  # a path: where the first answer's profile goes
    if profile_to:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        first_token_s, answer_s = profiler.runcall(answer, model, processor, conversation, images)
        with open(profile_to, "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)
    else:
        first_token_s, answer_s = answer(model, processor, conversation, images)
    then_first_s, then_answer_s = answer(model, processor, conversation, images)
    other_conversation, other_images = make_prompt(processor, OTHER_LENGTH)
    other_first_s, other_answer_s = answer(model, processor, other_conversation, other_images)
    return dict(variant=variant, warm_up=warm, load_s=load_s, warm_up_s=warm_up_s, first_token_s=first_token_s, answer_s=answer_s,
                then_first_token_s=then_first_s, then_answer_s=then_answer_s, other_length_first_token_s=other_first_s,
                other_length_answer_s=other_answer_s)


def run_process(variant: str, cache_dir: Path, bytecode_dir: Path, warm: bool, profile_dir=None,
                run: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"),
               TRITON_CACHE_DIR=str(cache_dir / "triton"), PYTHONPYCACHEPREFIX=str(bytecode_dir),
               PYTHONUNBUFFERED="1")
    if profile_dir:
        env["COLD_START_PROFILE"] = str(Path(profile_dir) / f"profile_{variant}_{run.split()[-1]}.txt")
    started = time.perf_counter()
    flags = [] if warm else ["--no-warm-up"]
    out = subprocess.run([sys.executable, __file__, "--child", variant, *flags], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {variant} process failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile-dir", help="write a cProfile summary of each process's first answer here")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the load-time warm-up")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, warm=not args.no_warm_up)), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("cold_start.py needs a CUDA GPU")
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['date']}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as bytecode, tempfile.TemporaryDirectory() as throwaway:
        run_process(args.variants[0], Path(throwaway), Path(bytecode), False)  # fills the bytecode cache only
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as caches:
                for run in ("a cold", "b warm"):
                    result = dict(run=run, **run_process(variant, Path(caches), Path(bytecode), not args.no_warm_up,
                                                         args.profile_dir, run))
                    rows.append(result)
                    print(json.dumps(result), flush=True)
    print("| variant | process | load s | warm-up s | first token s | 128-token answer s | then: first token / answer s "
          "| other length: first token / answer s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['run']} | {r['load_s']:.2f} | {r['warm_up_s']:.2f} | {r['first_token_s']:.2f} | "
              f"{r['answer_s']:.2f} | {r['then_first_token_s']:.3f} / {r['then_answer_s']:.3f} | "
              f"{r['other_length_first_token_s']:.3f} / {r['other_length_answer_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, results=rows), indent=2))


if __name__ == "__main__":
    main()
