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
def test_a_prompt_chunk_in_the_decode_step_gives_the_forward_s_logits(tiny_lm, tiny_config):
    """Rows of their own slots decode while 4 more tokens of another prompt (in a cache row of its
    own, 3 tokens in) ride the same step: each gets what a separate forward gives."""
    from deepseek_vl2.modeling.decoder import PromptChunk

    generator = torch.Generator().manual_seed(1)
    B, capacity, lengths = 2, 16, [5, 2]
    ids = torch.randint(0, tiny_config.vocab_size, (B, 6), generator=generator)
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 7), generator=generator)
    cache = KVCache(tiny_config, B, capacity, "cpu", torch.float32)
    for row, length in enumerate(lengths):
        tiny_lm(input_ids=ids[row : row + 1, :length], past_key_values=cache.rows(row, 1), use_cache=True)
    prompt_cache = KVCache(tiny_config, 1, capacity, "cpu", torch.float32)
    tiny_lm(input_ids=prompt[:, :3], past_key_values=prompt_cache, use_cache=True)
    slots = torch.tensor(lengths)
    visible = torch.ones(B, capacity, dtype=torch.bool)
    embeds = tiny_lm.get_input_embeddings()(prompt[:, 3:])
    chunk = PromptChunk(embeds, torch.arange(3, 7), torch.tensor([3]), prompt_cache)
    tokens = torch.stack([ids[row, length] for row, length in enumerate(lengths)])
    logits = tiny_lm.decode_step(tokens, slots, slots[:, None], visible, capacity, cache, chunk=chunk)
    assert logits.shape == (B + 1, tiny_config.vocab_size)
    for row, length in enumerate(lengths):
        want = tiny_lm(input_ids=ids[row : row + 1, : length + 1], use_cache=False).logits[0, -1]
        assert torch.allclose(logits[row], want, atol=1e-4)
    assert torch.allclose(logits[B], tiny_lm(input_ids=prompt, use_cache=False).logits[0, -1], atol=1e-4)
    # the chunk's entries went to the prompt's row, where a forward over the whole prompt puts them
    whole = tiny_lm(input_ids=prompt, use_cache=True).past_key_values
    for layer in range(tiny_config.num_hidden_layers):
        assert torch.allclose(prompt_cache.layer(layer).read(7), whole.layer(layer).read(7), atol=1e-5)
