"""Shared fixtures. The golden-fixture loaders live in goldens.py (imported here and by test files
in every folder: pytest puts this directory on sys.path with this conftest); `make_config` builds
the small decoder configs the unit tests use, `tiny_lm` a random-weight decoder of one."""
import pytest
import torch

from goldens import CHECKPOINTS, fixture_model  # noqa: F401  (re-exported for the test folders)


def decoder_config(use_mla: bool = True, **overrides):
    """A DeepseekV2Config small enough for exact CPU checks (two layers: dense, then MoE)."""
    from deepseek_vl2.modeling.language_config import DeepseekV2Config

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy", kv_lora_rank=16,
                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                use_mla=use_mla)
    return DeepseekV2Config(**dict(base, **overrides))


@pytest.fixture
def make_config():
    return decoder_config


@pytest.fixture(params=[True, False], ids=["mla", "mha"])
def tiny_config(request):
    return decoder_config(use_mla=request.param)


@pytest.fixture
def tiny_lm(tiny_config):
    """A random-weight DeepseekV2ForCausalLM of `tiny_config` (float32, eval)."""
    from deepseek_vl2.modeling.decoder import DeepseekV2ForCausalLM
    from deepseek_vl2.weights.random_init import init_random_weights

    with torch.device("meta"):
        lm = DeepseekV2ForCausalLM(tiny_config)
    lm.to_empty(device="cpu")
    return init_random_weights(lm, std=0.2, seed=0).eval()
