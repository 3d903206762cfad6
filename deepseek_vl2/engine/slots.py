"""KV slots of the continuous-batching engine: one preallocated cache of `max_num_seqs` rows, each
request holding one row (its slot) from admission to its end.

Rows are handed out lowest-free first, so the rows in use stay packed at the front and a decode
step runs over the prefix of rows up to the highest one in use (`prefix`), a view of the cache
rather than a gathered copy. Each row keeps its own length; what lies past it is garbage that the
decode step's per-row mask hides.

Prompts are prefilled into one more row, the prompt row (`prompt_row`), and copied into their slot
when complete (`take_prompt`): a prompt prefilled in pieces, between decode steps, needs a cache
row of its own, at a fixed address for the prompt graphs (prompt_graphs.py).
"""
import heapq
from typing import List

import torch

from ..modeling.kv_cache import KVCache

KV_BUCKET = 256  # decode steps attend over a multiple of this many slots (cuda_graphs.BUCKETS' step)


class SlotCache:
    """`max_num_seqs` rows x `capacity` tokens of KV cache, and which rows are free."""

    def __init__(self, lm, max_num_seqs: int, capacity: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if not 1 < capacity <= lm.config.max_position_embeddings:
            raise ValueError(f"the slot capacity must be in [2, {lm.config.max_position_embeddings}] (the model's "
                             f"context), got {capacity}")
        self.max_num_seqs = max_num_seqs
        self.capacity = capacity
        self.cache = KVCache(lm.config, max_num_seqs, capacity, lm.cache_devices(lm.device), lm.dtype)
        self.prompt = KVCache(lm.config, 1, capacity, lm.cache_devices(lm.device), lm.dtype)
        self._free: List[int] = list(range(max_num_seqs))  # a heap: the lowest free row first
        self._used = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used(self) -> frozenset:
        return frozenset(self._used)

    def allocate(self) -> int:
        """The lowest free row; IndexError when none is free."""
        if not self._free:
            raise IndexError("every KV slot is in use")
        row = heapq.heappop(self._free)
        self._used.add(row)
        return row

    def free(self, row: int) -> None:
        if row not in self._used:
            raise ValueError(f"KV slot {row} is not in use")
        self._used.remove(row)
        heapq.heappush(self._free, row)

    def clear(self, row: int) -> None:
        """Zero slot `row` (its next request must not read what a failed one left there)."""
        for part in self.cache.rows(row, 1).storage:
            part.zero_()

    def prompt_row(self, length: int) -> KVCache:
        """The prompt row holding `length` tokens of the prompt being prefilled (a view: writes go through)."""
        view = self.prompt.rows(0, 1)
        view.length = length
        return view

    def take_prompt(self, row: int, length: int) -> None:
        """Copy the first `length` tokens of the prompt row into slot `row`."""
        self.cache.rows(row, 1).copy_from(self.prompt_row(length))

    def prefix(self, count: int) -> KVCache:
        """The first `count` rows, for a decode step over them."""
        return self.cache.rows(0, count)


def kv_bucket(longest: int, capacity: int) -> int:
    """Slots a decode step attends over: `longest` (the longest row, its new token included) rounded
    up to a multiple of KV_BUCKET, at most the capacity."""
    return min(-(-longest // KV_BUCKET) * KV_BUCKET, capacity)


def device_tensor(values, device, dtype=torch.long) -> torch.Tensor:
    """A small host list as a tensor on `device` (one copy)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
