import pytest
import torch

from deepseek_vl2.modeling.kv_cache import KVCache
from deepseek_vl2.modeling.layer_pieces import LayerPieces


def _prompt(lm, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, lm.config.hidden_size, generator=generator)


@pytest.mark.parametrize("layers, chunk, past", [(1, 5, 0), (2, 64, 0), (1, 4, 6), (5, 3, 3)])
@torch.inference_mode()
def test_layer_pieces_match_a_chunked_forward_to_the_bit(tiny_lm, layers, chunk, past):
    """The same cache entries and last-token logits as the forward in `chunk`-token pieces, after
    `past` tokens already in the cache."""
    embeds = _prompt(tiny_lm, past + 13)
    expected_cache = KVCache(tiny_lm.config, 1, 40, "cpu", torch.float32)
    pieces_cache = KVCache(tiny_lm.config, 1, 40, "cpu", torch.float32)
    if past:
        for cache in (expected_cache, pieces_cache):
            tiny_lm(inputs_embeds=embeds[:, :past], past_key_values=cache, use_cache=True)
    for start in range(past, embeds.shape[1], chunk):
        expected = tiny_lm(inputs_embeds=embeds[:, start : start + chunk], past_key_values=expected_cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]

    pieces = LayerPieces(tiny_lm, embeds[:, past:], pieces_cache, chunk)
    assert pieces.layers_left == 2
    results = []
    while pieces.logits is None:
        results.append(pieces.advance(layers))
    assert len(results) == -(-2 // layers) and all(r is None for r in results[:-1])
    assert results[-1].shape == (1, tiny_lm.config.vocab_size) and results[-1].dtype == torch.float32
    assert torch.equal(results[-1], expected)
    assert pieces_cache.length == expected_cache.length == embeds.shape[1]
    for mine, theirs in zip(pieces_cache.storage, expected_cache.storage):
        assert torch.equal(mine, theirs)
    assert pieces.advance(layers) is results[-1]  # done: the same logits again, nothing run


def test_layer_pieces_refuse_a_batch_and_a_bad_chunk(tiny_lm):
    cache = KVCache(tiny_lm.config, 2, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"one prompt row \[1, T, hidden\], got \(2, 3, 32\)"):
        LayerPieces(tiny_lm, torch.zeros(2, 3, 32), cache, 4)
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        LayerPieces(tiny_lm, torch.zeros(1, 3, 32), cache, 0)
