"""Random weights for a model built without a checkpoint (lives in deepseek_vl2/weights/random_init.py)."""
from ..weights.random_init import init_random_weights

__all__ = ["init_random_weights"]
