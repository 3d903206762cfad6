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
        from ..engine import ContinuousEngine, PrefillSettings

        device = torch.device(model.device)
        slots = self.max_num_seqs or (SLOTS_CUDA if device.type == "cuda" else SLOTS_CPU)
        capacity = model.config.language_config.max_position_embeddings
        prefill_chunk = self.chunk_size if self.chunk_size > 0 else capacity
        return ContinuousEngine(model, processor, max_num_seqs=slots, prefill=PrefillSettings(chunk=prefill_chunk))
