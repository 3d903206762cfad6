"""Run by test_batch_cli.py in a subprocess: one small local Ray instance, then `python -m deepseek_vl2.batch
--ray` (through its main) and examples/ray_batch.py on it.

    python ray_session.py CHECKPOINT ROWS.jsonl OUT.jsonl GOOD_ROWS.jsonl EXAMPLE_OUT_DIR MAX_NEW
"""
import sys
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's package, as the test's (Ray's workers start in REPO, the cwd)


def main(checkpoint, rows, output, good_rows, example_output, max_new) -> int:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        from deepseek_vl2.batch.cli import main as batch_main

        status = batch_main(["--model_path", checkpoint, "--input", rows, "--output", output, "--max_new_tokens",
                             max_new, "--max_num_seqs", "3", "--ray", "--no_progress"])
        sys.path.insert(0, str(REPO / "examples"))
        import ray_batch

        ray_batch.main(["--model_path", checkpoint, "--input", good_rows, "--output", example_output,
                        "--gpus_per_actor", "0", "--max_new_tokens", max_new, "--batch_size", "3"])
        return status
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
