"""The continuous engine on CUDA (skipped without it), bf16 fixture checkpoints: every decode graph is
captured at construction and a graph step gives the eager step's logits; mixed requests run through
the graphs without a capture or compilation afterwards, greedy ones give their single-request
answers (a difference only at a recorded near-tie), and every slot is free at the end."""
import functools
import math

import pytest
import torch
from PIL import Image

from deepseek_vl2.engine import ChatEngine, GenerationParams, PrefillSettings
from deepseek_vl2.engine.continuous import ContinuousEngine
from deepseek_vl2.engine.decode_steps import compilations
from goldens import CHECKPOINTS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEAR_TIE = 0.1  # logit gap (bf16 model) under which greedy choices may differ between two batchings


def near_tie(gap: float, best: float) -> bool:
    """Whether two batchings may pick differently at a logit gap of `gap`: under NEAR_TIE, or at most
    two bf16 steps at the best logit's magnitude (bf16-rounded logits of 16 to 32 differ by 0.125 at
    the least, so a one-step gap there is a tie that NEAR_TIE alone would not call one)."""
    step = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(max(abs(best), 1e-30)))
    return gap < NEAR_TIE or gap <= 2 * step


@functools.cache
def chat_engine(checkpoint: str) -> ChatEngine:
    return ChatEngine.load(str(CHECKPOINTS[checkpoint]), device="cuda", dtype=torch.bfloat16)


def conversation(text: str, images) -> list:
    return [{"role": "<|User|>", "content": "<image>\n" * len(images) + text}, {"role": "<|Assistant|>", "content": ""}]


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
@torch.inference_mode()  # as the engine steps
def test_graph_step_gives_the_eager_step(checkpoint):
    chat = chat_engine(checkpoint)
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=5, max_length=600)
    steps = engine.steps
    assert steps.row_sizes == (1, 2, 4, 5) and steps.kv_sizes == (256, 512, 600)
    assert len(steps.graphs) == 12 and "captured 12 decode graphs" in engine.startup_summary
    generator = torch.Generator().manual_seed(0)
    for layer in engine.slots.cache.storage:
        layer.copy_(torch.randn(layer.shape, generator=generator).to(layer))
    tokens = torch.randint(0, engine.vocab_size, (4,), generator=generator).cuda()
    positions, active = [300, 17, 511, 5], [True, True, True, False]
    # each step writes its tokens' entries, which depend on nothing else: the same step sees the same cache
    steps.load(tokens, positions, active)
    graph = steps.run(4, 512).clone()
    steps.load(tokens, positions, active)
    del steps.graphs[(4, 512)]
    eager = steps.run(4, 512)
    assert steps.eager_steps == 1 and graph.shape[0] == 4
    torch.testing.assert_close(graph[:3], eager[:3], rtol=0, atol=0)


def teacher_forced_gap(chat, conv, images, answer, index):
    """The gap between the best and the second-best logit at answer[index], the single-request answer
    fed up to there (bf16, plain forward), and the best logit."""
    prepared = chat.processor(conversations=conv, images=images, force_batchify=True).to("cuda", dtype=torch.bfloat16)
    model = chat.model
    embeds = model.prepare_inputs_embeds(**prepared)
    if index:
        tokens = torch.tensor([answer[:index]], device="cuda")
        embeds = torch.cat([embeds, model.language.get_input_embeddings()(tokens)], dim=1)
    logits = model.language(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]
    top = logits.topk(2).values
    return (top[0] - top[1]).item(), top[0].item()


def mixed_requests():
    red, green = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (300, 500), (0, 90, 0))
    return [("Describe the image.", [red], GenerationParams(max_new_tokens=40, temperature=0)),
            ("Hello, who are you?", [], GenerationParams(max_new_tokens=12, temperature=0)),
            ("Tell a story.", [], GenerationParams(max_new_tokens=30, temperature=0.8, seed=7)),
            ("Compare.", [green], GenerationParams(max_new_tokens=33, temperature=0)),
            ("Count to ten.", [], GenerationParams(max_new_tokens=9, temperature=1.3, top_p=0.5)),
            ("What now?", [red, green], GenerationParams(max_new_tokens=300, temperature=0))]


def assert_single_answers(chat, requests, handles, singles, record_property):
    """Each greedy request got its single answer, or differs first at a near-tie (recorded); sampled
    ones ran their length."""
    ties = []
    for (text, images, params), handle, single in zip(requests, handles, singles):
        result = handle.result(timeout=0)
        assert result.finish_reason == single.finish_reason or result.token_ids != single.token_ids
        if params.temperature > 0:
            assert len(result.token_ids) == params.max_new_tokens or result.finish_reason == "stop"
            continue
        if result.token_ids != single.token_ids:
            index = next(i for i, (a, b) in enumerate(zip(result.token_ids, single.token_ids)) if a != b)
            with torch.inference_mode():
                gap, best = teacher_forced_gap(chat, conversation(text, images), images, single.token_ids, index)
            ties.append((text, index, gap, best))
            assert near_tie(gap, best), (f"{text!r}: the engine's answer differs at token {index}, where the gap is "
                                         f"{gap} (best logit {best})")
    record_property("near_ties", ties)


def singles_and_engine(checkpoint: str, prefill: PrefillSettings):
    """The mixed requests, their single answers (bf16, CUDA), and an engine of 4 slots x 2048 tokens
    with `prefill`: (chat, requests, singles, engine)."""
    chat = chat_engine(checkpoint)
    requests = mixed_requests()
    with torch.inference_mode():
        singles = [chat.chat(conversation(text, images), images, params) for text, images, params in requests]
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=4, max_length=2048, prefill=prefill)
    return chat, requests, singles, engine


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla"])
def test_mixed_requests_through_graphs(checkpoint, record_property):
    chat, requests, singles, engine = singles_and_engine(checkpoint, PrefillSettings(layer_tokens=64))
    compiled = compilations()
    handles = []
    for i, (text, images, params) in enumerate(requests):
        handles.append(engine.submit(engine.prepare_one(conversation(text, images), images), params))
        for _ in range(i % 3):
            engine.step()
    while engine.has_work():
        engine.step()
    assert engine.steps.eager_steps == 0 and compilations() == compiled
    assert engine.slots.free_count == 4 and engine.stats.max_running == 4 and engine.stats.layer_pieces > 0
    assert_single_answers(chat, requests, handles, singles, record_property)

