"""The engine as a Ray Data stage (`pip install -e ".[ray]"`): `BatchPredictor` is a callable class for
`map_batches`; each actor builds one engine on its device and answers each batch of rows through it.

    import ray
    from deepseek_vl2.batch.ray_stage import BatchPredictor

    ds = ray.data.read_json("rows.jsonl")        # the input format of rows.py, one row per line
    answers = ds.map_batches(BatchPredictor, fn_constructor_kwargs=dict(model_path="deepseek-ai/deepseek-vl2-tiny",
                                                                        base_dir="/data"),
                             compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_size=64)
    answers.write_json("answers/")

Output columns: id, text, finish_reason, prompt_tokens, completion_tokens, boxes (a list of
{"label", "box"}, empty when none) and error (None, or why the row has no answer; the other
columns are then None). An actor may run several batches at once (they share its engine; see
`actor_pool`). Image paths must be readable from every node (relative ones are taken from
`base_dir`).

`ray_executor` is what `--ray` runs: the driver reads and checks the input and resumes (driver.py),
sends the rows to do through the stage and writes the answers as they stream back, so the output
file and its resume are those of the other routes.
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from .driver import EngineFailed
from .engine_spec import SLOTS_CPU, SLOTS_CUDA, EngineSpec
from .rows import SETTINGS, Row, row_from_fields, run_settings

OUTPUT_COLUMNS = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "boxes", "error")


class BatchPredictor:
    def __init__(self, model_path: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 chunk_size: int = -1, max_num_seqs: Optional[int] = None, settings: Optional[dict] = None,
                 base_dir: Optional[str] = None, image_workers: Optional[int] = None,
                 quantization: Optional[str] = None):
        """`device`: default CUDA when the actor has a GPU, else the CPU; `settings`: the run's
        GenerationParams fields (greedy unless set); `base_dir`: where relative image paths start
        (default: the actor's working directory); `quantization`: "int8" / "int4", quantized while
        loading."""
        from ..engine.loading import default_device
        from .runner import EngineRunner

        spec = EngineSpec(model_path, dtype, chunk_size, max_num_seqs, quantization)
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.runner = EngineRunner(spec.build(device or default_device()), run_settings(**(settings or {})),
                                   image_workers=image_workers)

    def __call__(self, batch: dict) -> dict:
        names = list(batch)
        count = len(batch[names[0]]) if names else 0
        items = [row_from_fields({name: batch[name][i] for name in names}, self.base_dir) for i in range(count)]
        records: List[Optional[dict]] = [None] * count
        position = {}
        for index, item in enumerate(items):
            if isinstance(item, Row):
                position[id(item)] = index
            else:
                records[index] = dict(item.record(), id=getattr(item, "id", None))

        def emit(row: Row, record: dict) -> None:
            records[position[id(row)]] = record

        self.runner.run([item for item in items if isinstance(item, Row)], emit)
        return {name: [_column_value(record, name) for record in records] for name in OUTPUT_COLUMNS}


def _column_value(record: dict, name: str):
    if name == "boxes":
        return record.get("boxes", []) if "error" not in record else None
    return record.get(name)


def record_of(values: dict, row_id) -> dict:
    """An output row of the stage as the record the other routes write for that row."""
    if values.get("error") is not None:
        return {"id": row_id, "error": values["error"]}
    record = {"id": row_id, "text": values["text"], "finish_reason": values["finish_reason"],
              "prompt_tokens": int(values["prompt_tokens"]), "completion_tokens": int(values["completion_tokens"])}
    boxes = values.get("boxes")
    if boxes is not None and len(boxes):
        record["boxes"] = [{"label": box["label"], "box": [int(v) for v in box["box"]]} for box in boxes]
    return record


@dataclass
class RayOptions:
    address: Optional[str] = None  # None: what ray.init finds (RAY_ADDRESS, a local `ray start`), else a new instance
    actors: Optional[int] = None  # default: the cluster's GPUs / gpus_per_actor; 1 without GPUs
    gpus_per_actor: Optional[float] = None  # default: 1 on GPUs, 0 on the CPU
    cpus_per_actor: float = 1.0
    device: Optional[str] = None  # default: cuda when the cluster has GPUs
    image_workers: Optional[int] = None


def ray_executor(spec: EngineSpec, defaults, options: RayOptions):
    """The `--ray` executor of driver.py: the rows to do through a BatchPredictor stage."""

    def execute(rows, emit):
        import ray

        rows = list(rows)  # the driver holds the rows to do (text and paths: small)
        if not rows:
            return
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=options.address)
        try:
            device, gpus, actors = _placement(ray.cluster_resources(), options)
            slots = spec.max_num_seqs or (SLOTS_CUDA if device.startswith("cuda") else SLOTS_CPU)
            dataset = ray.data.from_items([_item(index, row) for index, row in enumerate(rows)])
            answers = dataset.map_batches(
                BatchPredictor, batch_size=slots, compute=actor_pool(ray, actors), num_gpus=gpus,
                num_cpus=options.cpus_per_actor, fn_constructor_kwargs=dict(
                    model_path=spec.model_path, device=device, dtype=spec.dtype, chunk_size=spec.chunk_size,
                    max_num_seqs=spec.max_num_seqs, settings=asdict(defaults), image_workers=options.image_workers,
                    quantization=spec.quantization))
            try:
                for values in answers.iter_rows():
                    row = rows[values["id"]]
                    emit(row, record_of(values, row.id))
            except ray.exceptions.RayError as error:  # an actor could not build its engine, or died
                raise EngineFailed(f"the Ray stage failed (a rerun answers the rows without a record): "
                                   f"{error}") from error
        finally:
            if started_here:
                ray.shutdown()

    return execute


def actor_pool(ray, actors: int):
    """`actors` engines; where this Ray allows it, each runs two batches at once (`BatchPredictor` is
    thread-safe: both go through its one engine), so that it takes its next batch while it finishes
    one and stays full across batch ends."""
    import inspect

    strategy = ray.data.ActorPoolStrategy
    if {"max_concurrent_calls_per_actor", "enable_true_multi_threading"} <= set(inspect.signature(strategy).parameters):
        return strategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    return strategy(size=actors)


def _placement(resources: dict, options: RayOptions):
    """(device of the actors, GPUs per actor, actors) on a cluster with `resources`."""
    cluster_gpus = resources.get("GPU", 0)
    device = options.device or ("cuda" if cluster_gpus else "cpu")
    on_gpu = device.startswith("cuda")
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if on_gpu else 0.0)
    if on_gpu and not cluster_gpus:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs")
    actors = options.actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    if actors < 1:
        raise ValueError(f"--ray_actors must be >= 1, got {actors}")
    return device, gpus, actors


def _item(index: int, row: Row) -> dict:
    """A row for the stage: its index in the driver's list as its id (any id type survives the trip),
    every setting column present (None: the run's), numbers as floats where GenerationParams takes
    floats (one Arrow type per column)."""
    item = {"id": index, "prompt": row.prompt, "images": list(row.images)}
    for name in SETTINGS:
        value = row.settings.get(name)
        if name == "stop" and value is not None:
            value = list(value)
        elif name in ("temperature", "top_p", "repetition_penalty") and value is not None:
            value = float(value)
        item[name] = value
    return item
