"""The continuous engine's prompt-layer graphs on CUDA (skipped without it), bf16 fixture checkpoints,
quantized too: one graph per (prompt bucket, layer) captured at construction, and a prompt replayed
through them leaves the cache entries and last-token logits that the eager layer pieces leave,
within bf16 rounding (the padded GEMMs may pick other kernels)."""
import functools

import pytest
import torch

from deepseek_vl2.engine import ChatEngine, PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.prompt_graphs import GraphLayerPieces
from deepseek_vl2.modeling.kv_cache import KVCache
from deepseek_vl2.modeling.layer_pieces import LayerPieces
from goldens import CHECKPOINTS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@functools.cache
def chat_engine(checkpoint: str, quantization=None) -> ChatEngine:
    return ChatEngine.load(str(CHECKPOINTS[checkpoint]), device="cuda", dtype=torch.bfloat16,
                           quantization=quantization)


@pytest.mark.parametrize("checkpoint, quantization", [("tiny_mha", None), ("small_mla", None), ("small_mla", "int4"),
                                                      ("tiny_mha", "int8")])
@torch.inference_mode()
def test_a_prompt_through_the_graphs_matches_the_eager_pieces(checkpoint, quantization):
    chat = chat_engine(checkpoint, quantization)
    lm = chat.model.language
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=2, max_length=600,
                              prefill=PrefillSettings(layer_tokens=1))
    graphs = engine.prefill.graphs
    layers = len(lm.model.layers)
    assert graphs.buckets == (256, 512, 600) and len(graphs.graphs) == 3 * layers
    assert f"captured {3 * layers} prompt-layer graphs" in engine.startup_summary
    generator = torch.Generator().manual_seed(0)
    for tokens in (300, 512, 37):
        embeds = (torch.randn(1, tokens, lm.config.hidden_size, generator=generator) * 0.5).cuda().bfloat16()
        eager_cache = KVCache(lm.config, 1, 600, "cuda", torch.bfloat16)
        eager = LayerPieces(lm, embeds, eager_cache, chunk=600)
        replayed = GraphLayerPieces(graphs, embeds)
        assert replayed.bucket == graphs.bucket_for(tokens) == {300: 512, 512: 512, 37: 256}[tokens]
        for _ in range(layers - 1):
            assert eager.advance(1) is None and replayed.advance(1) is None
        expected, logits = eager.advance(1), replayed.advance(1)
        assert logits.shape == expected.shape == (1, lm.config.vocab_size)
        torch.testing.assert_close(logits, expected, rtol=0.02, atol=0.05)
        for prompt_layer, eager_layer in zip(engine.slots.prompt.storage, eager_cache.storage):
            seq = engine.slots.prompt.seq_dim
            torch.testing.assert_close(prompt_layer.narrow(seq, 0, tokens).float(),
                                       eager_layer.narrow(seq, 0, tokens).float(), rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="holds 1 to 600 tokens, not 601"):
        graphs.bucket_for(601)
