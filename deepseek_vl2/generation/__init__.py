"""Generation: the HF-compatible generate / incremental_prefilling, decode loops, sampling, the CUDA-graph runner and the load-time warm-up."""
