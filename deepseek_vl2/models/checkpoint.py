"""Checkpoint names used by the processor, the CLI and offline_checkpoint (live in deepseek_vl2/weights/)."""
from ..weights.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_weights, save_weights
from ..weights.hub import HUB_PATTERNS, PROCESSOR_PATTERNS, CheckpointError, resolve_checkpoint_dir
from ..weights.layout import checkpoint_layout, official_shapes

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "load_weights", "save_weights", "HUB_PATTERNS", "PROCESSOR_PATTERNS",
           "CheckpointError", "resolve_checkpoint_dir", "checkpoint_layout", "official_shapes"]
