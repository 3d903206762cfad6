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


@torch.no_grad()
def test_rows_of_different_lengths_decode_at_their_own_slots(tiny_lm, tiny_config):
    """Rows whose prompts have different lengths (the continuous engine's rows) decode one token each
    at a slot of their own: each gets what a separate forward gives."""
    generator = torch.Generator().manual_seed(1)
    B, capacity, lengths = 2, 16, [5, 2]
    ids = torch.randint(0, tiny_config.vocab_size, (B, 6), generator=generator)
    cache = KVCache(tiny_config, B, capacity, "cpu", torch.float32)
    for row, length in enumerate(lengths):
        tiny_lm(input_ids=ids[row : row + 1, :length], past_key_values=cache.rows(row, 1), use_cache=True)
    slots = torch.tensor(lengths)
    visible = torch.ones(B, capacity, dtype=torch.bool)
    tokens = torch.stack([ids[row, length] for row, length in enumerate(lengths)])
    logits = tiny_lm.decode_step(tokens, slots, slots[:, None], visible, capacity, cache)
    assert logits.shape == (B, tiny_config.vocab_size)
    for row, length in enumerate(lengths):
        want = tiny_lm(input_ids=ids[row : row + 1, : length + 1], use_cache=False).logits[0, -1]
        assert torch.allclose(logits[row], want, atol=1e-4)
