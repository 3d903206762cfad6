"""Torch calls the continuous engine's thread makes per decode iteration, outside the decode step
itself (CPU, the tiny fixture checkpoint; no GPU needed).

    python benchmarks/iteration_calls.py [--rows 1 3] [--iterations 40]

Each torch call from Python releases and retakes the interpreter lock, where the server's other
threads can hold the engine's thread up; on a GPU the calls are the iteration's host work (the step
itself is one graph replay). `--rows` greedy requests decode together; after their prefill, each
iteration is counted under a TorchFunctionMode with the step (`DecodeSteps.run`) left out. Prints the
median count per iteration and the calls by name.
"""
import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepseek_vl2.engine import ChatEngine, GenerationParams, decode_steps  # noqa: E402
from deepseek_vl2.engine.continuous import ContinuousEngine  # noqa: E402

CHECKPOINT = REPO / "tests" / "fixtures" / "ckpt_tiny_mha"
CONVERSATION = [{"role": "<|User|>", "content": "Hello, count to fifty please."}, {"role": "<|Assistant|>", "content": ""}]


class CallCounter(TorchFunctionMode):
    """Counts torch calls by name while `counting` is set."""

    def __init__(self):
        super().__init__()
        self.counting = True
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def count(engine, rows: int, iterations: int):
    """(median calls per iteration, the last iteration's calls by name) with `rows` rows decoding."""
    counter = CallCounter()
    run = decode_steps.DecodeSteps.run

    def uncounted_run(steps, *args):
        counter.counting = False
        try:
            return run(steps, *args)
        finally:
            counter.counting = True

    for _ in range(rows):
        engine.submit(engine.prepare_one(CONVERSATION, []), GenerationParams(max_new_tokens=iterations + 20,
                                                                             temperature=0))
    while len(engine._running) < rows:  # the prefills, and the first tokens
        engine.step()
    totals = []
    decode_steps.DecodeSteps.run = uncounted_run
    try:
        for _ in range(iterations):
            counter.calls.clear()
            with counter:
                engine.step()
            totals.append(sum(counter.calls.values()))
    finally:
        decode_steps.DecodeSteps.run = run
    while engine.has_work():
        engine.step()
    return statistics.median(totals), counter.calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    chat = ChatEngine.load(str(CHECKPOINT), device="cpu", dtype=torch.float32)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=max(args.rows))
    for rows in args.rows:
        median, calls = count(engine, rows, args.iterations)
        print(f"{rows} rows: {median:.0f} torch calls per iteration outside the step; "
              + ", ".join(f"{name} {n}" for name, n in calls.most_common()))


if __name__ == "__main__":
    main()
