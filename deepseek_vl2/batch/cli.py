"""`python -m deepseek_vl2.batch --model_path ... --input IN.jsonl --output OUT.jsonl`: answer every row
of a JSONL file into another, resumably (rerun the same command after a crash or a kill: the rows
already in the output are skipped).

    python -m deepseek_vl2.batch --model_path deepseek-ai/deepseek-vl2-tiny --input rows.jsonl --output answers.jsonl
    python -m deepseek_vl2.batch ... --gpus 2                # two GPUs, one engine process each
    python -m deepseek_vl2.batch ... --device cpu --workers 2  # two CPU engine processes
    python -m deepseek_vl2.batch ... --ray                   # a Ray Data stage (pip install -e ".[ray]")

Where it runs: on a machine with GPUs, one engine per visible GPU (--gpus N: the first N); with
--device cuda:N, that GPU alone; on the CPU (no GPU, or --device cpu) one engine, or --workers N
engine processes. One engine runs in this process; several run in processes of their own, taking
rows from one queue. With --ray the engines are the actors of a Ray Data stage, on the cluster
`ray.init` finds (RAY_ADDRESS, a `ray start` cluster of this machine, else a new local instance) or
at --ray_address.

Sampling defaults to greedy (--temperature 0), unlike inference.py's 0.4: a dataset's answers then
do not depend on the run, the route or a resume. Rows may set their own settings (see
deepseek_vl2/batch/rows.py). Exit status: 0 when every row has its record (error records included),
1 when an engine failed (rows it held are missing; rerun), 2 for unusable arguments or files.
"""
import argparse
import sys
from pathlib import Path

from ..engine import GenerationParams, add_engine_arguments
from ..utils.extras import missing_extra
from .driver import EngineFailed, report, run_dataset
from .engine_spec import EngineSpec
from .output import OutputFileError
from .rows import run_settings

DEFAULTS = run_settings()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepseek_vl2.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or directory")
    p.add_argument("--input", required=True, type=Path, help="JSONL: one {\"id\", \"prompt\", \"images\"} per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL of answers; appended to when it exists (resume)")
    add_engine_arguments(p)
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 (default): greedy")
    p.add_argument("--top_p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--repetition_penalty", type=float, default=DEFAULTS.repetition_penalty, help="when sampling")
    p.add_argument("--seed", type=int, help="sampling seed of every row without its own")
    p.add_argument("--max_num_seqs", type=int, help="rows decoding at once per engine (default: 64 on a GPU, 8 on "
                                                    "the CPU)")
    p.add_argument("--gpus", type=int, help="engines on the first N visible GPUs, one process each "
                                            "(default: every visible GPU)")
    p.add_argument("--workers", type=int, help="CPU engine processes (default 1)")
    p.add_argument("--image_workers", type=int, help="threads reading and tiling images, per engine "
                                                     "(default: the cores, 2 to 8)")
    p.add_argument("--retry_errors", action="store_true", help="run again the rows whose record in the output is "
                                                               "an error")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray", "a Ray Data stage instead of local engines")
    ray.add_argument("--ray", action="store_true", help="run the engines as Ray actors")
    ray.add_argument("--ray_address", help="the cluster to join (default: what ray.init finds, else a local one)")
    ray.add_argument("--ray_actors", type=int, help="engines (default: the cluster's GPUs; 1 without GPUs)")
    ray.add_argument("--ray_gpus_per_actor", type=float, help="default: 1 on GPUs, 0 on the CPU")
    ray.add_argument("--ray_cpus_per_actor", type=float, default=1.0)
    return p.parse_args(argv)


def local_devices(device, gpus, workers) -> list:
    """The devices of the local engines (one entry per engine)."""
    import torch

    from ..engine.loading import checked_device

    target = checked_device(device)
    if target.type == "cuda":
        if workers is not None:
            raise ValueError("--workers counts CPU engine processes; on GPUs use --gpus")
        if target.index is not None:
            if gpus not in (None, 1):
                raise ValueError(f"--device {device} names one GPU; --gpus {gpus} needs --device cuda")
            return [str(target)]
        visible = torch.cuda.device_count()
        if not visible:
            raise ValueError(f"--device {device}: no CUDA GPU is visible")
        count = visible if gpus is None else gpus
        if not 1 <= count <= visible:
            raise ValueError(f"--gpus {gpus}: {visible} GPU(s) visible")
        return [f"cuda:{i}" for i in range(count)]
    if gpus is not None:
        raise ValueError(f"--gpus needs CUDA GPUs; the device is {target} (use --workers for CPU engine processes)")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return [str(target)] * (workers or 1)


def local_executor(args, spec: EngineSpec, defaults: GenerationParams):
    """One engine in this process, or engine processes, by the devices."""
    devices = local_devices(args.device, args.gpus, args.workers)
    if len(devices) == 1:
        def execute(rows, emit):
            from .runner import EngineRunner

            runner = EngineRunner(spec.build(devices[0]), defaults, image_workers=args.image_workers)
            try:
                runner.run(rows, emit)
            finally:
                runner.close()
        return execute

    from .processes import ProcessSettings, default_torch_threads, run_processes

    cpu = devices[0] == "cpu"
    settings = ProcessSettings(spec, defaults, image_workers=args.image_workers,
                               torch_threads=default_torch_threads(len(devices)) if cpu else None)

    def execute(rows, emit):
        reports = run_processes(devices, settings, rows, emit)
        for worker in reports:
            print(worker.line(), file=sys.stderr)
        if any(worker.error for worker in reports):
            raise EngineFailed("an engine process failed; rerun the same command to answer its rows")
    return execute


def check_args(args) -> None:
    """What argparse cannot check, named by flag."""
    if args.ray and (args.gpus is not None or args.workers is not None):
        raise ValueError("--gpus and --workers place local engines; with --ray use --ray_actors")
    if args.ray and (problem := missing_extra("ray")) is not None:
        raise ValueError(f"--ray needs the ray extra: {problem}")
    for flag in ("max_num_seqs", "image_workers", "ray_actors"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..models.checkpoint import CheckpointError

    try:
        check_args(args)
        spec = EngineSpec(args.model_path, args.dtype, args.chunk_size, args.max_num_seqs, args.quantization)
        defaults = run_settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
        if args.ray:
            from .ray_stage import RayOptions, ray_executor

            execute = ray_executor(spec, defaults, RayOptions(
                address=args.ray_address, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
                cpus_per_actor=args.ray_cpus_per_actor, device=args.device, image_workers=args.image_workers))
        else:
            execute = local_executor(args, spec, defaults)
        summary = run_dataset(args.input, args.output, execute, args.retry_errors, progress=not args.no_progress)
    except (ValueError, OSError, CheckpointError, OutputFileError) as error:
        print(f"error: {str(error).replace('GenerationParams.', '--')}", file=sys.stderr)
        return 2
    except EngineFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report(summary, args.output)
    return 0
