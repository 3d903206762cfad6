"""The DeepSeek-VL2 model: configs, vision tower, projector, tile layout, decoder and its layers, KV cache."""
