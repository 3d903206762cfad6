"""`python -m deepseek_vl2.serve` with an engine whose chat_batch fails as a broken GPU does (a CUDA
error) for requests with seed 666; used by test_serve_hostile to see the process exit."""
import sys

from deepseek_vl2.engine import ChatEngine
from deepseek_vl2.serve.__main__ import main

FAULT_SEED = 666
real_chat_batch = ChatEngine.chat_batch


def chat_batch(self, rows):
    if any(row.params.seed == FAULT_SEED for row in rows):
        raise RuntimeError("CUDA error: device-side assert triggered")
    return real_chat_batch(self, rows)


ChatEngine.chat_batch = chat_batch

if __name__ == "__main__":
    main(sys.argv[1:] + ["--scheduler", "static"])  # chat_batch is the static path's
