"""What one engine of a batch run is built from: plain settings that cross process boundaries (a
worker process of `--gpus`, a Ray actor) and are built into a ContinuousEngine on the device there."""
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.loading import default_dtype, load_model_and_processor

SLOTS_CUDA = 64  # rows decoding at once on a GPU (what benchmarks/serve_bench.py measures)
SLOTS_CPU = 8


@dataclass
class EngineSpec:
    model_path: str
    dtype: Optional[str] = None  # "bfloat16", "float16", "float32"; default: bfloat16 on a GPU, float32 on the CPU
    chunk_size: int = -1  # prompt tokens prefilled between two decode steps (-1: a whole prompt at once)
    max_num_seqs: Optional[int] = None  # KV slots: rows decoding at once (default SLOTS_CUDA / SLOTS_CPU)
    quantization: Optional[str] = None  # "int8" / "int4": weights quantized while loading (from_pretrained)

    def __post_init__(self):
        if self.chunk_size == 0 or self.chunk_size < -1:
            raise ValueError(f"--chunk_size must be -1 (whole prompts) or a positive integer, got {self.chunk_size}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"--max_num_seqs must be >= 1, got {self.max_num_seqs}")

    def load(self, device: str):
        """(processor, model) on `device` (quantized while loading when the spec says so: one place for
        every route)."""
        dtype = getattr(torch, self.dtype) if self.dtype else default_dtype(device)
        return load_model_and_processor(self.model_path, device=device, dtype=dtype, quantization=self.quantization)

    def build(self, device: str):
        """The ContinuousEngine of this spec on `device` (on CUDA with its decode graphs, captured here)."""
        processor, model = self.load(device)
        return self.engine_for(model, processor)

    def engine_for(self, model, processor):
        """The ContinuousEngine of this spec over `model`; a ValueError naming --max_num_seqs and the size of
        the KV cache when the device cannot hold it."""
        from ..engine import ContinuousEngine, PrefillSettings

        device = torch.device(model.device)
        slots = self.max_num_seqs or (SLOTS_CUDA if device.type == "cuda" else SLOTS_CPU)
        capacity = model.config.language_config.max_position_embeddings
        prefill_chunk = self.chunk_size if self.chunk_size > 0 else capacity
        try:
            return ContinuousEngine(model, processor, max_num_seqs=slots, prefill=PrefillSettings(chunk=prefill_chunk))
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            setting = f"--max_num_seqs {slots}" + ("" if self.max_num_seqs else f" (the default on {device.type})")
            raise ValueError(f"{setting}: the engine ran out of memory on {device} while it was being built; its KV "
                             f"cache alone is {slots} rows x {capacity} tokens = {kv_cache_gib(model, slots):,.1f} GiB "
                             f"({first_line(error)}); lower --max_num_seqs") from error


def is_out_of_memory(error: RuntimeError) -> bool:
    """Whether `error` is an allocator's refusal (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message


def kv_cache_gib(model, slots: int) -> float:
    """GiB of the KV cache of `slots` rows of a full context, as the engine lays it out (sized on the meta
    device: nothing is allocated)."""
    from ..modeling.kv_cache import KVCache

    lm = getattr(model, "language", model)
    cache = KVCache(lm.config, slots, lm.config.max_position_embeddings, torch.device("meta"), lm.dtype)
    return sum(part.numel() * part.element_size() for part in cache.storage) / 2**30


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
