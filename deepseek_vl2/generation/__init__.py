"""Generation: HF-compatible generate, decode loops, sampling, the CUDA-graph runner, the load-time warm-up."""
