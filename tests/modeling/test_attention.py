"""Attention on its own: the additive mask `build_attention_inputs` makes, attention through the KV
cache one token at a time equal to attention over the whole sequence, MLA's absorbed and
expanded forms equal, and MLA's fused input projection equal to the official pair it holds."""
import pytest
import torch
import torch.nn.functional as F

from deepseek_vl2.kernels import reference
from deepseek_vl2.modeling.attention import build_attention_inputs, make_attention
from deepseek_vl2.modeling.kv_cache import KVCache
from deepseek_vl2.modeling.rope import rope_for
from deepseek_vl2.weights.layout import checkpoint_layout, to_official
from deepseek_vl2.weights.random_init import init_random_weights

MIN = torch.finfo(torch.float32).min


def test_mask_hides_future_keys_and_padding():
    assert build_attention_inputs(None, 0, 4, 4, torch.float32, "cpu").mask is None  # plain causal
    padding = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    attn = build_attention_inputs(padding, 2, 2, 4, torch.float32, "cpu")
    assert attn.cache_positions.tolist() == [2, 3] and attn.kv_len == 4
    assert attn.mask.tolist() == [[[[MIN, 0, 0, MIN], [MIN, 0, 0, 0]]]]
    # a fixed-capacity decode step: slots past the mask are unwritten and hidden
    step = build_attention_inputs(torch.ones(1, 2, dtype=torch.bool), 0, 1, 4, torch.float32, "cpu",
                                  cache_positions=torch.tensor([1]))
    assert step.mask.tolist() == [[[[0, 0, MIN, MIN]]]]


def _layer(config):
    attention = init_random_weights(make_attention(config), std=0.3, seed=1).eval()
    return attention, rope_for(config)


@torch.no_grad()
def test_decoding_through_the_cache_equals_attending_the_whole_sequence(tiny_config):
    attention, rope = _layer(tiny_config)
    B, S = 2, 6
    x = torch.randn(B, S, tiny_config.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = rope.lookup(torch.arange(S)[None].expand(B, S), x.dtype)
    query, new = attention.project(x, cos, sin)
    whole = attention.attend(query, new, build_attention_inputs(None, 0, S, S, x.dtype, "cpu"))

    cache = KVCache(tiny_config, B, S, "cpu", x.dtype)
    prefix = 3
    q, new = attention.project(x[:, :prefix], cos[:, :prefix], sin[:, :prefix])
    attn = build_attention_inputs(None, 0, prefix, prefix, x.dtype, "cpu")
    parts = [attention.attend(q, cache.update(0, attn.cache_positions, new, prefix), attn)]
    for t in range(prefix, S):
        q, new = attention.project(x[:, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1])
        attn = build_attention_inputs(torch.ones(B, t + 1, dtype=torch.bool), t, 1, t + 1, x.dtype, "cpu")
        parts.append(attention.attend(q, cache.update(0, attn.cache_positions, new, t + 1), attn))
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)


@torch.no_grad()
def test_mla_absorbed_and_expanded_forms_agree(make_config):
    config = make_config(use_mla=True)
    attention, rope = _layer(config)
    B, S = 2, 5
    x = torch.randn(B, S, config.hidden_size, generator=torch.Generator().manual_seed(3))
    cos, sin = rope.lookup(torch.arange(S)[None].expand(B, S), x.dtype)
    (q_nope, q_pe, _), latent = attention.project(x, cos, sin)
    weight, scale = attention.kv_b_proj.weight, attention.softmax_scale
    mask = reference.causal_mask(S, x.dtype, "cpu")
    expanded = reference.mla_expanded(q_nope, q_pe, latent, None, weight, scale)
    w_uk, w_uv = reference.kv_b_halves(weight, config.num_attention_heads, config.qk_nope_head_dim)
    q_absorbed = reference.per_head_matmul(q_nope, w_uk)
    absorbed = reference.per_head_matmul(reference.latent_attention(q_absorbed, q_pe, latent, mask, scale),
                                         w_uv.transpose(1, 2))
    assert torch.allclose(absorbed, expanded, atol=1e-5)


@torch.no_grad()
def test_grouped_query_heads_share_their_kv_head(make_config):
    config = make_config(use_mla=False)  # 4 query heads, 2 kv heads
    q = torch.randn(1, 4, 3, 8)
    keys_values = torch.randn(1, 2, 2, 3, 8)
    out = reference.mha_attention(q, keys_values, None).view(1, 3, 4, 8)
    for head in range(4):
        kv = keys_values[:, :, head // 2]
        want = torch.nn.functional.scaled_dot_product_attention(q[:, head : head + 1], kv[:, 0:1], kv[:, 1:2],
                                                                is_causal=True)
        assert torch.allclose(out[:, :, head], want[:, 0], atol=1e-6)
    assert config.num_key_value_heads == 2


@torch.no_grad()
@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_proj", "q_a_proj"])
def test_mla_fused_input_projection_is_the_official_pair(make_config, q_lora_rank):
    """q_kv_a_proj holds q_proj (or q_a_proj) and kv_a_proj_with_mqa under their official names; the
    query and latent it makes are those of the two official products."""
    config = make_config(use_mla=True, q_lora_rank=q_lora_rank)
    attention, rope = _layer(config)
    params = dict(attention.named_parameters())
    official = {name: to_official(params, where) for name, where in checkpoint_layout(attention).items()}
    q_name = "q_proj" if q_lora_rank is None else "q_a_proj"
    q_rows = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    assert official[f"{q_name}.weight"].shape == (q_rows if q_lora_rank is None else q_lora_rank, config.hidden_size)
    assert official["kv_a_proj_with_mqa.weight"].shape == (config.kv_lora_rank + config.qk_rope_head_dim,
                                                           config.hidden_size)
    assert "q_kv_a_proj.weight" not in official
    B, S = 2, 3
    x = torch.randn(B, S, config.hidden_size, generator=torch.Generator().manual_seed(4))
    cos, sin = rope.lookup(torch.arange(S)[None].expand(B, S), x.dtype)
    (q_nope, q_pe, _), latent = attention.project(x, cos, sin)
    q = F.linear(x, official[f"{q_name}.weight"])
    if q_lora_rank is not None:
        q = F.linear(attention.q_a_layernorm(q), official["q_b_proj.weight"])
    q = q.view(B, S, config.num_attention_heads, -1).transpose(1, 2)
    assert torch.allclose(q_nope, q[..., :config.qk_nope_head_dim], atol=1e-6)
    c_kv = F.linear(x, official["kv_a_proj_with_mqa.weight"])[..., :config.kv_lora_rank]
    assert torch.allclose(latent[..., :config.kv_lora_rank], attention.kv_a_layernorm(c_kv), atol=1e-6)
    assert q_pe.shape == (B, config.num_attention_heads, S, config.qk_rope_head_dim)


def test_mla_with_attention_bias_needs_a_query_rank(make_config):
    with pytest.raises(ValueError, match="attention_bias needs q_lora_rank"):
        make_attention(make_config(use_mla=True, attention_bias=True))
    assert make_attention(make_config(use_mla=True, attention_bias=True, q_lora_rank=12)).q_kv_a_proj.bias is not None
