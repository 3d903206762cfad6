"""The decoder's fixed-shape decode step (what the CUDA-graph runner captures) against its forward."""
import torch

from deepseek_vl2.modeling.kv_cache import KVCache


@torch.no_grad()
def test_decode_step_equals_the_forward(tiny_lm, tiny_config):
    B, T, capacity = 2, 5, 16
    ids = torch.randint(0, tiny_config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    cache = KVCache(tiny_config, B, capacity, "cpu", torch.float32)
    tiny_lm(input_ids=ids[:, :T], past_key_values=cache, use_cache=True)
    visible = torch.zeros(B, capacity, dtype=torch.bool)
    visible[:, : T + 1] = True
    logits = tiny_lm.decode_step(ids[:, T], torch.full((B,), T), torch.tensor([T]), visible, capacity, cache)
    want = tiny_lm(input_ids=ids, use_cache=False).logits[:, -1]
    assert logits.dtype == torch.float32 and torch.allclose(logits, want, atol=1e-4)
    assert cache.layer(0).read(T + 1).shape[1 if tiny_config.use_mla else 3] == T + 1
