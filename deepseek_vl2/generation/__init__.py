"""Generation: the HF-compatible generate / incremental_prefilling, decode loops, sampling, and the CUDA-graph runner."""
