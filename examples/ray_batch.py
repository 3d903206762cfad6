"""Answer a JSONL dataset with a Ray Data pipeline of DeepSeek-VL2 engines (`pip install -e ".[ray]"`).

    python examples/ray_batch.py --model_path deepseek-ai/deepseek-vl2-tiny --input rows.jsonl --output answers/
    python examples/ray_batch.py ... --address auto --actors 16      # an existing cluster, 16 GPUs

Each actor of the `map_batches` stage holds one engine (`BatchPredictor`) on one GPU (`--gpus_per_actor`,
0 on a CPU cluster) and answers batches of rows through it; the answers are written as JSON files
under --output (Ray's `write_json`: one file per block). Rows are in the format of
`python -m deepseek_vl2.batch` (deepseek_vl2/batch/rows.py), read here by `ray.data.read_json`: every
line must be valid JSON and each column of one type (all ids strings, say). For a resumable run
into one file, with invalid lines reported, use `python -m deepseek_vl2.batch --ray`.
"""
import argparse
import os


def answers(model_path: str, input_path: str, actors: int, gpus_per_actor: float, max_new_tokens: int,
            batch_size: int = 64, device=None):
    """The Ray Dataset of the answers to the rows of `input_path` (lazy: nothing runs until it is read)."""
    import ray

    from deepseek_vl2.batch.ray_stage import BatchPredictor

    rows = ray.data.read_json(input_path)
    return rows.map_batches(
        BatchPredictor,
        fn_constructor_kwargs=dict(model_path=model_path, device=device, settings={"max_new_tokens": max_new_tokens},
                                   base_dir=os.path.dirname(os.path.abspath(input_path))),
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor, batch_size=batch_size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--input", required=True, help="JSONL rows: {\"id\", \"prompt\", \"images\"}")
    p.add_argument("--output", required=True, help="a directory for the answers' JSON files")
    p.add_argument("--address", help="the Ray cluster (default: what ray.init finds, else a local instance)")
    p.add_argument("--actors", type=int, default=1, help="engines")
    p.add_argument("--gpus_per_actor", type=float, default=1.0, help="0 on a CPU cluster")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64, help="rows per call of an actor")
    args = p.parse_args(argv)

    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)
    device = None if args.gpus_per_actor else "cpu"
    answers(args.model_path, args.input, args.actors, args.gpus_per_actor, args.max_new_tokens, args.batch_size,
            device).write_json(args.output)


if __name__ == "__main__":
    main()
