"""The continuous engine's decode step, run eagerly or, on CUDA, as CUDA graphs captured before the
first request.

A step decodes one token for each row of a prefix of the KV slots and attends over a number of
cache slots; both vary from step to step. With graphs, rows are padded up to the next of
`row_sizes` (1, 2, 4, ... up to max_num_seqs) and cache slots to the next multiple of KV_BUCKET
(`kv_bucket`), and `capture_all` captures one graph per (rows, cache length) at start-up, so no
request ever waits for a capture or a compilation. Padding rows are inactive (masked; the engine
points their cache writes where nothing is read).

The step reads its inputs from static buffers (`load`: tokens from the device, rope positions =
cache slots and active flags from the host) and writes its logits into one static buffer, whatever
the key, so the outputs' memory is paid once.
The steps run the plain pieces (no torch.compile): measured on an H200, graphs of compiled pieces
replayed slower at 8 and more rows, and compiling took half a minute at start-up.
"""
import logging
import sys
import time
import weakref
from typing import Dict, Sequence, Tuple

import torch

from ..generation.cuda_graphs import capture_each
from .slots import KV_BUCKET, SlotCache

logger = logging.getLogger(__name__)

ROW_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows a decode graph is made for (max_num_seqs is added)


def compilations() -> int:
    """Graphs torch.compile has compiled in this process so far (0 while dynamo was never loaded)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def row_sizes(max_num_seqs: int) -> Tuple[int, ...]:
    return tuple(size for size in ROW_SIZES if size < max_num_seqs) + (max_num_seqs,)


def kv_sizes(capacity: int) -> Tuple[int, ...]:
    """Every value `slots.kv_bucket` can give for this capacity."""
    return tuple(range(KV_BUCKET, capacity, KV_BUCKET)) + (capacity,)


class DecodeSteps:
    """Decode steps over the first rows of `slots`; CUDA graphs when `use_graphs`."""

    def __init__(self, lm, slots: SlotCache, use_graphs: bool):
        if use_graphs and lm.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on CUDA, not {lm.device}")
        self._lm = weakref.ref(lm)
        self.slots = slots
        self.use_graphs = use_graphs
        R = slots.max_num_seqs
        self.row_sizes = row_sizes(R) if use_graphs else tuple(range(1, R + 1))
        self.kv_sizes = kv_sizes(slots.capacity)
        self.inputs = torch.zeros(3, R, dtype=torch.long, device=lm.device)  # tokens, positions, active
        self.logits = torch.zeros(R, lm.config.vocab_size, dtype=torch.float32, device=lm.device)
        self.graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.eager_steps = 0  # steps of a graph engine that found no graph (none, when capture_all ran)

    def rows_for(self, rows: int) -> int:
        """The row count a step over `rows` rows runs with (padded up to a graph's size)."""
        return next(size for size in self.row_sizes if size >= rows)

    def load(self, tokens: torch.Tensor, positions: Sequence[int], active: Sequence[bool]) -> None:
        """The next step's inputs for its first len(positions) rows: `tokens` already on the device
        (copied there, no host round trip), positions and active flags from the host (one copy)."""
        host = torch.tensor([list(positions), [int(a) for a in active]], dtype=torch.long)
        self.inputs[1:, : host.shape[1]].copy_(host, non_blocking=True)
        self.inputs[0, : host.shape[1]].copy_(tokens)

    def run(self, rows: int, kv_len: int) -> torch.Tensor:
        """Logits [rows, vocab] of the loaded inputs; `rows` from `rows_for`, `kv_len` a kv_sizes value
        covering the rows."""
        graph = self.graphs.get((rows, kv_len))
        if graph is not None:
            graph.replay()
        else:
            self.eager_steps += self.use_graphs
            self._step(rows, kv_len)
        return self.logits[:rows]

    def _step(self, rows: int, kv_len: int) -> None:
        lm = self._lm()
        tokens, positions, active = self.inputs[0, :rows], self.inputs[1, :rows], self.inputs[2, :rows]
        visible = active.bool()[:, None].expand(rows, kv_len)
        logits = lm.decode_step(tokens, positions, positions[:, None], visible, kv_len, self.slots.prefix(rows))
        self.logits[:rows].copy_(logits)

    def capture_all(self) -> str:
        """Capture a graph for every (row size, kv size), while no slot is in use (the warm-up runs
        write to slot 0 of every row); returns what was done, for the start-up log."""
        started = time.perf_counter()
        # the largest first (capture_each): the smaller steps reuse the memory it leaves in the pool
        self.capture([(rows, kv_len) for rows in reversed(self.row_sizes) for kv_len in reversed(self.kv_sizes)])
        summary = (f"captured {len(self.graphs)} decode graphs (rows {', '.join(map(str, self.row_sizes))} x "
                   f"{len(self.kv_sizes)} cache lengths up to {self.kv_sizes[-1]}) in "
                   f"{time.perf_counter() - started:.1f} s")
        logger.info(summary)
        return summary

    def capture(self, keys: Sequence[Tuple[int, int]]) -> None:
        """Capture the graphs of `keys` (rows, kv_len), while no slot is in use."""
        if self.slots.used:
            raise RuntimeError("decode graphs are captured before any request is admitted")
        self.inputs.zero_()
        self.graphs.update(capture_each(keys, self._step, self.pool, self._lm().device))
