"""The continuous engine's prompt-layer graphs on CUDA (skipped without it), bf16 fixture checkpoints,
quantized too: one graph per (prompt bucket, layer) captured at construction, and a prompt replayed
through them leaves the cache entries and last-token logits that the eager layer pieces leave,
within bf16 rounding (the padded GEMMs may pick other kernels).

The eager pieces run with the quantized kernels a graph takes: a graph's GEMMs have the bucket's
padded rows and are captured, so a quantized linear layer there never takes the dense tiles (at most
QUANT_LINEAR_TILE_ROWS rows) and an expert stack is never dequantized whole (not while capturing),
where an eager prompt of the same tokens may. The int8 paths round differently (the tiles put each
column's scale on the float32 sums, the whole copy rounds scale x weight to bf16 first): on the tiny
fixtures up to 0.2 on logits near 14, past this test's bound, which is about the graphs, not the
kernels (each checked against its reference in tests/kernels)."""
import contextlib
import functools

import pytest
import torch

from deepseek_vl2.engine import ChatEngine, PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.prompt_graphs import GraphLayerPieces
from deepseek_vl2.kernels import dispatch
from deepseek_vl2.modeling.kv_cache import KVCache
from deepseek_vl2.modeling.layer_pieces import LayerPieces
from goldens import CHECKPOINTS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@functools.cache
def chat_engine(checkpoint: str, quantization=None) -> ChatEngine:
    return ChatEngine.load(str(CHECKPOINTS[checkpoint]), device="cuda", dtype=torch.bfloat16,
                           quantization=quantization)


@contextlib.contextmanager
def graph_kernels():
    """Eager quantized GEMMs on the kernels a captured, padded prompt graph takes (the docstring)."""
    with dispatch.quant_linear_tile_rows(0), dispatch.stack_dequantize_rows(None):
        yield


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
        with graph_kernels():  # for the eager pieces; a replay runs the kernels it captured whatever dispatch says
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
