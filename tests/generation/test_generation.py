"""generate / incremental_prefilling behaviour (official greedy parity is in test_modeling_parity.py),
and the GPU fast path's decoding logic run eagerly on the CPU."""
import gc
import weakref

import pytest
import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from deepseek_vl2.generation import cuda_graphs, generate as generation
from deepseek_vl2.generation.cuda_graphs import StaticDecoder
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.weights.random_init import init_random_weights
from goldens import CASES, CHECKPOINTS, fixture_model, golden_inputs, tensors

CASE = "p02_single_1024_square"  # small_mla: MLA, 2036 prompt tokens


@pytest.fixture(scope="module")
def prompt():
    model = fixture_model(CASES[CASE]["checkpoint"])
    inputs = golden_inputs(CASE)
    mask = tensors(CASE)["attention_mask"].bool()
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
    return model, inputs, mask, embeds


def greedy(model, **kw):
    kw = dict(dict(max_new_tokens=10, eos_token_id=1, pad_token_id=1), **kw)
    return model.generate(do_sample=False, **kw)


@pytest.mark.parametrize("chunk", [1, 7, 512, 5000])
def test_chunked_prefill_gives_the_unchunked_tokens(prompt, chunk):
    model, inputs, mask, embeds = prompt
    T = mask.shape[1]
    reference = greedy(model, inputs_embeds=embeds, attention_mask=mask, input_ids=inputs["input_ids"])
    if chunk == 1:  # 2035 one-token forwards: check the cache itself on a short prefix instead
        short = dict(inputs_embeds=embeds[:, :40], attention_mask=mask[:, :40])
        _, past = model.incremental_prefilling(chunk_size=1, **short)
        _, whole = model.incremental_prefilling(chunk_size=64, **short)
        assert past.get_seq_length() == 39
        assert all(torch.allclose(a, b, atol=1e-5) for layer_a, layer_b in zip(past, whole)
                   for a, b in zip(layer_a, layer_b))
        return
    embeds_out, past = model.incremental_prefilling(attention_mask=mask, chunk_size=chunk, **inputs)
    assert torch.equal(embeds_out, embeds) and past.get_seq_length() == T - 1
    out = greedy(model, inputs_embeds=embeds_out, attention_mask=mask, past_key_values=past, **inputs)
    assert torch.equal(out, reference)


def test_prefill_accepts_missing_mask_and_one_token_prompt(prompt):
    model, inputs, mask, embeds = prompt
    _, past = model.incremental_prefilling(inputs_embeds=embeds[:, :1])
    assert past.get_seq_length() == 0
    out = greedy(model, inputs_embeds=embeds[:, :1], past_key_values=past, max_new_tokens=3)
    assert torch.equal(out, greedy(model, inputs_embeds=embeds[:, :1], max_new_tokens=3))


def test_prefill_gets_a_mask_only_where_it_pads(prompt, monkeypatch):
    """A prompt mask that pads nothing reaches the decoder's prefill as no mask (nothing for it to
    read back from the device; the same tokens as with no mask at all); a padding mask reaches it."""
    model, _, _, embeds = prompt
    forward, seen = type(model.language).forward, []

    def recording(self, *args, **kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            seen.append(kwargs.get("attention_mask"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.language), "forward", recording)
    short = dict(inputs_embeds=embeds[:, :40], max_new_tokens=3)
    ones = torch.ones(1, 40, dtype=torch.long)
    assert torch.equal(greedy(model, attention_mask=ones, **short), greedy(model, **short))
    model.incremental_prefilling(inputs_embeds=embeds[:, :40], attention_mask=ones, chunk_size=16)
    assert len(seen) == 2 + 3 and all(mask is None for mask in seen)
    seen.clear()
    padded = ones.clone()
    padded[0, :5] = 0
    greedy(model, attention_mask=padded, **short)
    model.incremental_prefilling(inputs_embeds=embeds[:, :40], attention_mask=padded, chunk_size=16)
    assert len(seen) == 1 + 3 and all(torch.equal(mask[0, :5].cpu(), torch.zeros(5, dtype=torch.bool)) for mask in seen)


def test_legacy_tuple_cache_is_accepted(prompt):
    model, inputs, mask, embeds = prompt
    _, past = model.incremental_prefilling(attention_mask=mask, chunk_size=512, **inputs)
    legacy = [tuple(t.clone() for t in layer) for layer in past]  # the reference's list of tuples
    assert legacy[0][0].shape[1:3] == (1, mask.shape[1] - 1)  # k_pe [B, 1, L, rope]
    out = greedy(model, inputs_embeds=embeds, attention_mask=mask, past_key_values=legacy, **inputs)
    assert torch.equal(out, greedy(model, inputs_embeds=embeds, attention_mask=mask, **inputs))


def test_left_padded_incremental_prefill_matches_single_rows():
    """Positions in incremental_prefilling skip the left padding, unlike the reference's
    (docs/deviations.md#incremental_prefilling-positions-skip-left-padding)."""
    model = fixture_model("small_mla")
    t = tensors("p09_batch_left_pad")
    ids, mask = t["batch_input_ids"], t["batch_attention_mask"].bool()
    embeds = model.language.get_input_embeddings()(ids).detach()
    _, past = model.incremental_prefilling(inputs_embeds=embeds, attention_mask=mask, chunk_size=100)
    batch = greedy(model, inputs_embeds=embeds, attention_mask=mask, past_key_values=past, max_new_tokens=8)
    for row in range(2):
        keep = mask[row]
        single = greedy(model, inputs_embeds=embeds[row : row + 1, keep], max_new_tokens=8)
        assert torch.equal(batch[row], single[0])


def test_streaming_text_equals_the_returned_text(prompt):
    model, inputs, mask, embeds = prompt
    processor = DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["small_mla"]))
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    out = greedy(model, inputs_embeds=embeds, attention_mask=mask, streamer=streamer, max_new_tokens=12)
    streamed = "".join(streamer)
    assert streamed == processor.tokenizer.decode(out[0]) and streamed


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_and_eos_end_generation(prompt):
    model, inputs, mask, embeds = prompt
    free = greedy(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10)
    stopped = greedy(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10,
                     stopping_criteria=[StopAfter(4)])
    assert torch.equal(stopped, free[:, :4])
    eos = int(free[0, 2])  # pretend the third token is the end of sentence
    ended = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ended, free[:, : list(free[0]).index(eos) + 1])
    short = greedy(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                   eos_token_id=eos)
    assert short.shape[1] == 10 and eos not in short[0].tolist()


def test_finished_rows_are_padded_while_others_continue():
    model = fixture_model("small_mla")
    t = tensors("p09_batch_left_pad")
    embeds = model.language.get_input_embeddings()(t["batch_input_ids"]).detach()
    mask = t["batch_attention_mask"].bool()
    free = greedy(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8)
    eos = int(free[0, 1])
    if eos in free[1, :7].tolist():
        pytest.skip("both rows emit the chosen token early")
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=eos, pad_token_id=-5 % 2000)
    assert out[0, 1] == eos and (out[0, 2:] == -5 % 2000).all()
    assert torch.equal(out[1], free[1, : out.shape[1]])


def test_sampling_is_reproducible_with_a_seed(prompt):
    model, inputs, mask, embeds = prompt

    def sample(seed):
        return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=True,
                              temperature=0.9, top_p=0.95, top_k=0, repetition_penalty=1.1,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(3), sample(3))
    assert any(not torch.equal(sample(3), sample(s)) for s in (4, 5, 6))
    torch.manual_seed(11)
    first = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=True)
    torch.manual_seed(11)
    assert torch.equal(first, model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                                             do_sample=True))


def test_return_dict_scores_and_recipe_shapes(prompt):
    model, inputs, mask, embeds = prompt
    only_new = model.language.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5,
                                       do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert only_new.sequences.shape == (1, 5) and len(only_new.scores) == 5
    assert only_new.scores[0].shape == (1, model.config.language_config.vocab_size)
    with_prompt = greedy(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, **inputs)
    T = mask.shape[1]
    assert torch.equal(with_prompt[:, :T], inputs["input_ids"]) and torch.equal(with_prompt[:, T:],
                                                                                 only_new.sequences)
    from_ids = greedy(model, attention_mask=mask, max_new_tokens=5, **inputs)  # vision inside generate
    assert torch.equal(from_ids, with_prompt)


def test_vlmevalkit_call_sequence():
    """VLMEvalKit: bf16 load, processor(...).to(device), incremental_prefilling(chunk_size=512), generate
    with past_key_values, decode from len(input_ids[0])."""
    from PIL import Image
    from transformers import AutoModelForCausalLM

    path = str(CHECKPOINTS["tiny_mha"])
    processor = DeepseekVLV2Processor.from_pretrained(path)
    tokenizer = processor.tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.bfloat16).eval()
    image = Image.new("RGB", (640, 480), (200, 30, 30))
    conversation = [{"role": "<|User|>", "content": "<image>\nWhat is shown?", "images": [image]},
                    {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=[image], force_batchify=True,
                       system_prompt="").to(model.device)
    with torch.no_grad():
        inputs_embeds, past_key_values = model.incremental_prefilling(
            input_ids=inputs.input_ids, images=inputs.images, images_seq_mask=inputs.images_seq_mask,
            images_spatial_crop=inputs.images_spatial_crop, attention_mask=inputs.attention_mask, chunk_size=512)
        outputs = model.generate(
            inputs_embeds=inputs_embeds, input_ids=inputs.input_ids, images=inputs.images,
            images_seq_mask=inputs.images_seq_mask, images_spatial_crop=inputs.images_spatial_crop,
            attention_mask=inputs.attention_mask, past_key_values=past_key_values,
            pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, max_new_tokens=16, do_sample=False, use_cache=True)
    new = outputs[0][len(inputs.input_ids[0]):]
    assert 1 <= len(new) <= 16
    assert isinstance(tokenizer.decode(new.cpu().tolist(), skip_special_tokens=True), str)
    plain = model.generate(inputs_embeds=inputs_embeds, input_ids=inputs.input_ids,
                           attention_mask=inputs.attention_mask, pad_token_id=1, eos_token_id=1,
                           max_new_tokens=16, do_sample=False)
    assert torch.equal(outputs, plain)


def test_bad_generation_arguments(prompt):
    model, inputs, mask, embeds = prompt
    base = dict(inputs_embeds=embeds, attention_mask=mask)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        model.generate(do_sample=True, temperature=0.0, **base)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(do_sample=True, top_p=1.5, **base)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.incremental_prefilling(chunk_size=0, **base)
    with pytest.raises(ValueError, match="together more than the model's context of 4096; ask for at most 2060"):
        model.generate(max_new_tokens=3000, **base)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(inputs_embeds=embeds, attention_mask=mask[:, 1:])
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(num_beams=4, **base)
    with pytest.raises(TypeError, match="unexpected arguments: \\['frobnicate'\\]"):
        model.generate(frobnicate=True, **base)
    _, past = model.incremental_prefilling(chunk_size=4096, **base)
    with pytest.raises(ValueError, match="already holds 2035 tokens"):
        model.generate(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], past_key_values=past)


def test_prompt_longer_than_the_context_is_refused(prompt):
    model, _, _, embeds = prompt
    long = embeds.repeat(1, 3, 1)[:, :4100]
    with pytest.raises(ValueError, match="needs 4100 positions but the model's context is max_position_embeddings=4096"):
        model(inputs_embeds=long, use_cache=False)
    with pytest.raises(ValueError, match="the prompt has 4100 tokens"):
        model.generate(inputs_embeds=long, max_new_tokens=1)


# ---- the GPU fast path's logic, run eagerly (no graphs, no compile) on the CPU ----------------------

@pytest.fixture
def eager_fast_path(monkeypatch):
    monkeypatch.setattr(generation, "static_decoder",
                        lambda lm, batch, settings, device: StaticDecoder(lm, batch, use_graphs=False, compile=False))


@pytest.mark.parametrize("checkpoint", ["tiny_mha", "small_mla", "base_noaux"])
def test_fast_path_logic_matches_plain_decoding(checkpoint, monkeypatch):
    model = fixture_model(checkpoint)
    t = tensors("p09_batch_left_pad")
    embeds = model.language.get_input_embeddings()(t["batch_input_ids"]).detach()
    mask = t["batch_attention_mask"].bool()
    kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=300, do_sample=False)
    plain = model.language.generate(**kw, return_dict_in_generate=True, output_scores=True)
    monkeypatch.setattr(generation, "static_decoder",
                        lambda lm, batch, settings, device: StaticDecoder(lm, batch, use_graphs=False, compile=False))
    greedy_on_device = model.language.generate(**kw)  # 437 + 300 tokens: crosses a 512 KV bucket
    host_loop = model.language.generate(**kw, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(greedy_on_device, plain.sequences) and torch.equal(host_loop.sequences, plain.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(host_loop.scores, plain.scores))


def test_fast_path_logic_eos_min_new_tokens_streaming_and_stopping(prompt, eager_fast_path):
    model, inputs, mask, embeds = prompt
    free = greedy(model.language, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20)
    eos = int(free[0, 3])
    ended = model.language.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20,
                                    do_sample=False, eos_token_id=eos)
    assert torch.equal(ended, free[:, : free[0].tolist().index(eos) + 1])
    kept = model.language.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20,
                                   min_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert kept.shape[1] == 20 and eos not in kept[0].tolist()
    processor = DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["small_mla"]))
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    streamed = greedy(model.language, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20,
                      streamer=streamer)
    assert "".join(streamer) == processor.tokenizer.decode(streamed[0]) and torch.equal(streamed, free)
    stopped = greedy(model.language, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20,
                     stopping_criteria=[StopAfter(5)])
    assert torch.equal(stopped, free[:, :5])


# ---- the fast path's decoders: freed with their model, remade when its tensors change (CPU, eager) ----

def _fresh(checkpoint="tiny_mha", dtype=torch.float32):
    """A model of its own (fixture_model's are shared and cached)."""
    return DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[checkpoint]), dtype=dtype, progress=False)


def _decode_kwargs(lm):
    t = tensors("p09_batch_left_pad")
    embeds = lm.get_input_embeddings()(t["batch_input_ids"][:, -40:]).detach()
    return dict(inputs_embeds=embeds, attention_mask=t["batch_attention_mask"][:, -40:].bool(), max_new_tokens=8,
                do_sample=False, return_dict_in_generate=True, output_scores=True)


def _through_registry(monkeypatch, compile=False):
    monkeypatch.setattr(generation, "static_decoder", lambda lm, batch, settings, device: cuda_graphs.decoder_for(
        lm, batch, use_graphs=False, compile=compile))


@pytest.mark.parametrize("compiled", [False, True])
def test_deleted_model_goes_at_once_with_its_decoders(monkeypatch, compiled):
    """`del model` frees the model, its decoders and their compiled steps without the cycle collector."""
    if compiled:  # dynamo's tracing and guards (what could hold on to a model) without inductor's slow CPU build
        monkeypatch.setattr(cuda_graphs, "compile_options", lambda: dict(fullgraph=True, dynamic=False, backend="eager"))
    _through_registry(monkeypatch, compile=compiled)
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list
    model = _fresh(dtype=torch.bfloat16)  # bf16: CPU float32 has no grouped_mm for the compiler
    kw = _decode_kwargs(model.language)
    gc.disable()  # a reference cycle would then keep the model alive, as it does until a collection
    try:
        model.language.generate(**kw)
        model.language.generate(**dict(kw, return_dict_in_generate=False, output_scores=False))  # in-graph greedy
        decoder = cuda_graphs._DECODERS[model.language][1][2]
        codes = decoder.codes
        assert len(codes) == (4 if compiled else 0) and all(entries(code) for code in codes)
        alive = [weakref.ref(x) for x in (model, model.language, model.language.lm_head.weight, decoder,
                                           decoder.cache.storage[0])]
        del model, decoder
        assert [ref() for ref in alive] == [None] * len(alive)
        assert not any(entries(code) for code in codes)  # dynamo's compiled entries went too
    finally:
        gc.enable()


def test_decoders_are_remade_when_the_weights_move_or_are_replaced(monkeypatch):
    model = _fresh()
    lm = model.language
    kw = _decode_kwargs(lm)
    other = init_random_weights(_fresh(), seed=1)  # same shapes, different weights
    expected = {"first": lm.generate(**kw), "other": other.language.generate(**kw)}  # the plain path
    assert not torch.equal(expected["first"].scores[0], expected["other"].scores[0])
    first_weights = {k: v.clone() for k, v in model.state_dict().items()}
    _through_registry(monkeypatch)

    def generate(weights):
        out = lm.generate(**kw)
        assert torch.equal(out.sequences, expected[weights].sequences)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, expected[weights].scores))
        entry = cuda_graphs._DECODERS[lm][1]
        assert list(entry) == [2]  # one batch size in use: stale decoders are not kept
        return entry[2]

    decoder = generate("first")
    assert generate("first") is decoder  # reused while the tensors stay
    model.load_state_dict(other.state_dict())  # copied into the same tensors: graphs would read the new values
    assert generate("other") is decoder
    old = weakref.ref(decoder)
    del decoder
    model.load_state_dict(first_weights, assign=True)  # new tensors: a graph would read freed memory
    decoder = generate("first")
    assert old() is None
    lm.lm_head.weight.data = lm.lm_head.weight.data.clone()
    assert generate("first") is not decoder
    model.to(torch.bfloat16)  # .to / .cpu / .cuda free the decoders at once
    assert lm not in cuda_graphs._DECODERS
    lm.generate(**_decode_kwargs(lm))
    assert cuda_graphs._DECODERS[lm][1][2].cache.dtype == torch.bfloat16
