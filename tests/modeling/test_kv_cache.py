"""KVCache: `update` writes new entries at slots and returns exactly what attention reads; length,
growth, crop, reorder, copying and the legacy tuple view."""
import pytest
import torch

from deepseek_vl2.modeling.kv_cache import KVCache


def entries(config, B, S, start=0.0):
    """Distinct values per (row, token, element) in the layer's entry shape for S tokens."""
    if config.use_mla:
        shape = (B, S, config.kv_lora_rank + config.qk_rope_head_dim)
    else:
        shape = (B, 2, config.num_key_value_heads, S, config.hidden_size // config.num_attention_heads)
    return start + torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


def seq(config, t, start, length):
    return t.narrow(1 if config.use_mla else 3, start, length)


@pytest.mark.parametrize("use_mla", [True, False])
def test_update_returns_the_written_entries_and_what_was_there(use_mla, make_config):
    config = make_config(use_mla=use_mla)
    cache = KVCache(config, 2, 8, "cpu", torch.float32)
    first = entries(config, 2, 3)
    got = cache.update(0, torch.arange(3), first, 3)
    assert torch.equal(got, first)
    second = entries(config, 2, 2, start=1000.0)
    got = cache.update(0, torch.tensor([3, 4]), second, 6)  # slot 5 not written yet: zeros
    assert torch.equal(seq(config, got, 0, 3), first) and torch.equal(seq(config, got, 3, 2), second)
    assert not seq(config, got, 5, 1).any()
    assert got.data_ptr() == cache.storage[0].data_ptr()  # a view of the cache, no copy
    assert not cache.storage[1].any()  # other layers untouched


def test_update_casts_to_the_cache_dtype_and_layer_views_agree(make_config):
    config = make_config()
    cache = KVCache(config, 1, 4, "cpu", torch.bfloat16)
    new = torch.full((1, 1, 24), 1.00390625, dtype=torch.float32)  # rounds to 1.0 in bf16
    view = cache.layer(1)
    out = view.update(torch.tensor([2]), new, 4)
    assert out.dtype == torch.bfloat16 and out[0, 2].eq(1.0).all() and not out[0, :2].any()
    assert torch.equal(cache.layer(1).read(3), out[:, :3])


@pytest.mark.parametrize("use_mla", [True, False])
def test_reserve_keeps_tokens_and_legacy_round_trip(use_mla, make_config):
    config = make_config(use_mla=use_mla)
    cache = KVCache(config, 2, 3, "cpu", torch.float32)
    for layer in range(2):
        cache.update(layer, torch.arange(3), entries(config, 2, 3, start=layer), 3)
    cache.length = 3
    cache.reserve(5)
    assert cache.capacity == 6  # doubled
    assert torch.equal(cache.layer(1).read(3), entries(config, 2, 3, start=1))
    legacy = cache.to_legacy()
    assert len(legacy) == 2 and all(t.shape[2] == 3 for layer in legacy for t in layer)
    if use_mla:  # (k_pe, c_kv): the rope part after the latent
        assert torch.equal(legacy[0][1][:, 0], entries(config, 2, 3)[..., : config.kv_lora_rank])
    back = KVCache.from_legacy(legacy, config, extra_capacity=2)
    assert back.length == 3 and back.capacity == 5
    assert all(torch.equal(back.layer(i).read(3), cache.layer(i).read(3)) for i in range(2))


def test_crop_and_reorder(make_config):
    config = make_config()
    cache = KVCache(config, 3, 4, "cpu", torch.float32)
    cache.update(0, torch.arange(4), entries(config, 3, 4), 4)
    cache.length = 4
    assert cache.crop(2).get_seq_length() == 2 and cache[0][0].shape[2] == 2
    with pytest.raises(ValueError, match="cannot crop a cache of 2 tokens to 3"):
        cache.crop(3)
    cache.reorder(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    assert torch.equal(cache.layer(0).read(4), entries(config, 3, 4)[[2, 0]])


def test_copy_from_and_per_layer_devices(make_config):
    config = make_config()
    source = KVCache(config, 1, 2, ["cpu", "cpu"], torch.float32)
    source.update(1, torch.arange(2), entries(config, 1, 2), 2)
    source.length = 2
    target = KVCache(config, 1, 1, "cpu", torch.float32).copy_from(source)
    assert target.length == 2 and torch.equal(target.layer(1).read(2), entries(config, 1, 2))
    with pytest.raises(ValueError, match="3 devices for 2 layers"):
        KVCache(config, 1, 2, ["cpu"] * 3, torch.float32)


@pytest.mark.parametrize("use_mla", [True, False])
def test_per_row_write_equals_plain_writes_row_by_row(use_mla, make_config):
    """write([B, S] positions) puts each row's entries at that row's own slots: the same as a plain
    write of that row alone at its slots; the other slots stay as they were."""
    config = make_config(use_mla=use_mla)
    B, S = 3, 2
    rows_cache, plain = KVCache(config, B, 16, "cpu", torch.float32), KVCache(config, B, 16, "cpu", torch.float32)
    new = entries(config, B, S, start=7.0)
    positions = torch.tensor([[0, 1], [5, 6], [14, 15]])
    rows_cache.layer(1).write(positions, new)
    for b in range(B):
        plain.rows(b, 1).layer(1).write(positions[b], new[b:b + 1])
    assert torch.equal(rows_cache.storage[1], plain.storage[1])
    for b in range(B):
        got = seq(config, rows_cache.storage[1][b:b + 1], int(positions[b, 0]), S)
        assert torch.equal(got, new[b:b + 1])
    assert not rows_cache.storage[0].any()  # other layers untouched
    untouched = torch.ones(B, 16, dtype=torch.bool)
    untouched[torch.arange(B)[:, None], positions] = False
    other = rows_cache.storage[1].movedim(rows_cache.seq_dim, 1)[untouched]
    assert not other.any()


def test_row_views_share_storage_and_keep_their_own_length(make_config):
    config = make_config()
    cache = KVCache(config, 4, 8, "cpu", torch.float32)
    view = cache.rows(2, 1)
    assert view.batch_size == 1 and view.length == 0 and view.capacity == 8
    new = entries(config, 1, 3, start=1.0)
    view.update(0, torch.arange(3), new, 3)
    view.length = 3
    assert torch.equal(seq(config, cache.storage[0][2:3], 0, 3), new)
    assert not cache.storage[0][:2].any() and not cache.storage[0][3:].any() and cache.length == 0
    assert cache.rows(0, 3).storage[0].data_ptr() == cache.storage[0].data_ptr()
