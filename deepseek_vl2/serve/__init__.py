"""An OpenAI-compatible HTTP server for DeepSeek-VL2 that batches concurrent requests.

    python -m deepseek_vl2.serve --model_path deepseek-ai/deepseek-vl2-tiny --port 8000

Modules: `app` (routes), `schemas` (request checks), `media` (images), `prompt` (conversation),
`scheduler` (batching), `engine_process` (the engine in a process of its own, `--engine-process`),
`responses` (OpenAI bodies), `errors`, `settings`, `__main__` (flags).
"""
