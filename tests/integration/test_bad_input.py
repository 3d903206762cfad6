"""Bad input through the public Python API and sampling with extreme settings: every case raises a
TypeError / ValueError / FileNotFoundError whose message names the
argument, the message or image index and what was expected, or (for extreme but meaningful
sampling settings) gives finite probabilities and valid tokens."""
import shutil

import pytest
import torch
from PIL import Image

from deepseek_vl2.generation.sampling import SamplingSettings, choose_next, process_logits, unusable_rows
from deepseek_vl2.models import DeepseekVLV2Processor
from deepseek_vl2.utils.io import load_pil_images
from goldens import CHECKPOINTS, fixture_model

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
VOCAB = 2048  # the fixture checkpoints' vocab_size


def turn(content="Hi", **extra):
    return [{"role": USER, "content": content, **extra}, {"role": ASSISTANT, "content": ""}]


def image(size=(64, 48)):
    return Image.new("RGB", size, (90, 20, 160))


@pytest.fixture(scope="module")
def proc():
    return DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS["tiny_mha"]))


@pytest.fixture(scope="module")
def model():
    return fixture_model("tiny_mha")


@pytest.fixture(scope="module")
def batch(proc):
    return proc(conversations=turn("<image>\nWhat is this?"), images=[image()]).to("cpu", dtype=torch.float32)


# ---- the processor ------------------------------------------------------------------------------

PROCESSOR_CASES = [
    # values of the wrong Python type anywhere in a conversation
    ("content-none", dict(conversations=[{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": None}]),
     TypeError, r"message 1 of `conversations`: 'content' must be a str, got NoneType \(use '' for the turn"),
    ("content-int", dict(conversations=[{"role": USER, "content": 42}, {"role": ASSISTANT, "content": ""}]),
     TypeError, r"message 0 of `conversations`: 'content' must be a str, got int"),
    ("content-list", dict(conversations=turn(["Hi", "there"])),
     TypeError, r"message 0 of `conversations`: 'content' must be a str, got list"),
    ("system-content-int", dict(conversations=[{"role": "system", "content": 1}] + turn()),
     TypeError, r"message 0 of `conversations`: 'content' must be a str, got int"),
    ("role-none", dict(conversations=[{"role": None, "content": "Hi"}, {"role": ASSISTANT, "content": ""}]),
     TypeError, r"message 0 of `conversations`: 'role' must be a str, got NoneType"),
    ("missing-content", dict(conversations=[{"role": USER}, {"role": ASSISTANT, "content": ""}]),
     ValueError, r"message 0 of `conversations` has no 'content' key"),
    ("missing-role", dict(conversations=[{"role": USER, "content": "Hi"}, {"content": ""}]),
     ValueError, r"message 1 of `conversations` has no 'role' key"),
    ("message-str", dict(conversations=[{"role": USER, "content": "Hi"}, "answer"]),
     TypeError, r"message 1 of `conversations` is a str, expected a dict with 'role' and 'content'"),
    ("message-tuple", dict(conversations=[(USER, "Hi"), {"role": ASSISTANT, "content": ""}]),
     TypeError, r"message 0 of `conversations` is a tuple, expected a dict"),
    ("message-none", dict(conversations=[None]),
     TypeError, r"message 0 of `conversations` is a NoneType"),
    ("conversation-str", dict(conversations="<|User|>: Hi"),
     TypeError, r"`conversations` must be a list of \{'role': \.\.\., 'content': \.\.\.\} dicts, got str"),
    ("conversation-dict", dict(conversations={"role": USER, "content": "Hi"}),
     TypeError, r"`conversations` must be a list .* got dict"),
    ("conversation-int", dict(conversations=3), TypeError, r"`conversations` must be a list .* got int"),
    # a conversation without a user turn
    ("no-user-turn", dict(conversations=[{"role": ASSISTANT, "content": ""}]),
     ValueError, r"the conversation has no user message \(role '<\|User\|>' or 'user'\)"),
    ("system-only", dict(conversations=[{"role": "system", "content": "Be brief."}, {"role": ASSISTANT, "content": ""}]),
     ValueError, r"the conversation has no user message"),
    ("image-tag-in-system", dict(conversations=[{"role": "system", "content": "<image>"}] + turn()),
     ValueError, r"message 0 \('system'\) contains <image>; images may only appear in user messages"),
    # more images than <image> tags (the reference ignores the extra ones silently)
    ("more-images-than-tags", dict(conversations=turn("Hi"), images=[image()]),
     ValueError, r"the conversation has 0 <image> tags but 1 images were given; pass one image per <image> tag"),
    ("more-images-than-tags-2", dict(conversations=turn("<image> and"), images=[image(), image()]),
     ValueError, r"1 <image> tags but 2 images"),
    # the images argument and its entries
    ("images-str", dict(conversations=turn("<image>"), images="photo.png"),
     TypeError, r"`images` must be a list of PIL images \(or None\), got str"),
    ("images-int", dict(conversations=turn("<image>"), images=3),
     TypeError, r"`images` must be a list of PIL images \(or None\), got int"),
    ("image-entry-none", dict(conversations=turn("<image>"), images=[None]),
     ValueError, r"image 0 is a NoneType, expected a PIL.Image.Image"),
    ("image-entry-tensor", dict(conversations=turn("<image>"), images=[torch.zeros(3, 8, 8)]),
     ValueError, r"image 0 is a Tensor, expected a PIL.Image.Image"),
    # images of zero width or height
    ("image-zero-width", dict(conversations=turn("<image>"), images=[Image.new("RGB", (0, 10))]),
     ValueError, r"image 0 is 0x10 pixels; width and height must be at least 1"),
    ("image-zero-height", dict(conversations=turn("<image><image>"), images=[image(), Image.new("RGB", (10, 0))]),
     ValueError, r"image 1 is 10x0 pixels; width and height must be at least 1"),
    ("image-zero-size-prompt", dict(prompt="<image>", images=[Image.new("L", (0, 0))]),
     ValueError, r"image 0 is 0x0 pixels"),
    # the prompt path and the other arguments
    ("prompt-int", dict(prompt=5), TypeError, r"`prompt` must be a str, got int"),
    ("prompt-bytes", dict(prompt=b"Hi"), TypeError, r"`prompt` must be a str, got bytes"),
    ("prompt-list-sft", dict(prompt=["Hi"], apply_sft_format=True), TypeError, r"`prompt` must be a str, got list"),
    ("system-prompt-int", dict(conversations=turn(), system_prompt=7),
     TypeError, r"`system_prompt` must be a str, got int"),
]


@pytest.mark.parametrize("kwargs, error, message", [case[1:] for case in PROCESSOR_CASES],
                         ids=[case[0] for case in PROCESSOR_CASES])
def test_processor_bad_input(proc, kwargs, error, message):
    with pytest.raises(error, match=message):
        proc(**kwargs)
    with pytest.raises(error, match=message):
        proc.process_one(**kwargs)


def test_processor_defined_edge_inputs(proc):
    """Inputs whose meaning is defined keep working: images as a tuple, system_prompt=None (no
    system prompt), a 1x1 image."""
    as_tuple = proc(conversations=turn("<image>"), images=(image(),), force_batchify=False)
    as_list = proc(conversations=turn("<image>"), images=[image()], force_batchify=False)
    assert torch.equal(as_tuple.input_ids, as_list.input_ids)
    assert proc(conversations=turn(), system_prompt=None).sft_format == proc(conversations=turn()).sft_format
    assert proc(conversations=turn("<image>"), images=[Image.new("RGB", (1, 1))]).images_spatial_crop.tolist() == [[[1, 1]]]


@pytest.mark.parametrize("samples, message", [
    (lambda p: p.process_one(conversations=turn()), r"batchify takes a list of samples from process_one, got "
                                                    r"VLChatProcessorOutput"),
    (lambda p: [{"input_ids": torch.tensor([1])}], r"batchify: sample 0 is a dict, expected a VLChatProcessorOutput"),
    (lambda p: [p.process_one(conversations=turn()), p(conversations=turn())],
     r"batchify: sample 1 is a BatchCollateOutput, expected a VLChatProcessorOutput"),
], ids=["single-sample", "dict-sample", "batch-output-sample"])
def test_batchify_bad_samples(proc, samples, message):
    with pytest.raises(TypeError, match=message):
        proc.batchify(samples(proc))


def copy_of_checkpoint(tmp_path):
    """The tiny checkpoint's processor and tokenizer files (no weights) in a fresh directory."""
    for path in CHECKPOINTS["tiny_mha"].iterdir():
        if path.suffix == ".json" and path.name != "config.json":
            shutil.copy(path, tmp_path / path.name)
    return tmp_path


TOKENIZER_TEXT = (CHECKPOINTS["tiny_mha"] / "tokenizer.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("content, message", [
    (TOKENIZER_TEXT[: len(TOKENIZER_TEXT) // 3], r"cannot be parsed as JSON"),
    ("\x00\x01 garbage", r"cannot be parsed as JSON"),
    ("", r"cannot be parsed as JSON"),
    ('{"version": "1.0"}', r"cannot be parsed: it is JSON but has no tokenizer 'model'"),
], ids=["truncated", "garbage", "empty", "json-not-a-tokenizer"])
def test_corrupt_tokenizer_file_is_named(tmp_path, content, message):
    directory = copy_of_checkpoint(tmp_path)
    (directory / "tokenizer.json").write_text(content, encoding="utf-8")
    path = str(directory / "tokenizer.json")
    with pytest.raises(ValueError, match=r"the tokenizer file " + path.replace(".", r"\.") + " " + message):
        DeepseekVLV2Processor.from_pretrained(str(directory))


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: (d / "tokenizer.json").unlink(), FileNotFoundError, r"tokenizer\.json does not exist"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"model_max_length": '), ValueError,
     r"the tokenizer file .*tokenizer_config\.json cannot be parsed as JSON"),
    (lambda d: (d / "processor_config.json").write_text("{oops"), ValueError,
     r"cannot parse the processor config .*processor_config\.json: Expecting property name"),
    (lambda d: (d / "processor_config.json").write_text("[1, 2]"), ValueError,
     r"processor_config\.json must hold a JSON object, not a list"),
    (lambda d: (d / "processor_config.json").write_text('{"patch_size": 14, "downsample_ratio": 2}'), ValueError,
     r"processor_config\.json lacks the required keys \['candidate_resolutions'\]"),
    (lambda d: (d / "processor_config.json").write_text(
        '{"candidate_resolutions": [], "patch_size": 14, "downsample_ratio": 2}'), ValueError,
     r"candidate_resolutions must be a non-empty list of \(width, height\) pairs"),
], ids=["tokenizer-missing", "tokenizer-config-truncated", "config-not-json", "config-a-list",
        "config-missing-key", "config-no-resolutions"])
def test_broken_processor_directory(tmp_path, edit, error, message):
    directory = copy_of_checkpoint(tmp_path)
    edit(directory)
    with pytest.raises(error, match=message):
        DeepseekVLV2Processor.from_pretrained(str(directory))


def test_from_pretrained_bad_path(tmp_path):
    with pytest.raises(TypeError, match=r"from_pretrained needs a directory path or a hub id \(str\), got NoneType"):
        DeepseekVLV2Processor.from_pretrained(None)
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(ValueError, match=r"checkpoint directory '.*no/such/dir' does not exist"):
        DeepseekVLV2Processor.from_pretrained(missing)


# ---- load_pil_images ----------------------------------------------------------------------------

@pytest.mark.parametrize("conversations, message", [
    ("photo.png", r"`conversations` must be a list of message dicts, got str"),
    (None, r"`conversations` must be a list of message dicts, got NoneType"),
    (["photo.png"], r"message 0 of `conversations` is a str, expected a dict"),
    ([{"role": USER, "images": "photo.png"}], r"message 0: 'images' must be a list of file paths or PIL images, got str"),
    (turn() + [{"role": USER, "images": [image(), 3]}], r"message 2, image 1: expected a file path or a PIL image, got int"),
    ([{"role": USER, "images": [None]}], r"message 0, image 0: expected a file path or a PIL image, got NoneType"),
], ids=["conversation-str", "conversation-none", "message-str", "images-str", "entry-int", "entry-none"])
def test_load_pil_images_bad_input(conversations, message):
    with pytest.raises(TypeError, match=message):
        load_pil_images(conversations)


def test_load_pil_images_none_means_no_images():
    assert load_pil_images([{"role": USER, "content": "Hi", "images": None}]) == []


# ---- the model: token ids, embeddings, image inputs -----------------------------------------------

OUT_OF_VOCAB = [(-1, r"input_ids holds the token id -1, outside the vocabulary \[0, 2048\)"),
                (VOCAB, r"input_ids holds the token id 2048, outside the vocabulary \[0, 2048\) \(vocab_size=2048\)")]
ENTRY_POINTS = {
    "generate": lambda m, ids: m.generate(input_ids=ids, max_new_tokens=2),
    "language.generate": lambda m, ids: m.language.generate(input_ids=ids, max_new_tokens=2),
    "forward": lambda m, ids: m(input_ids=ids),
    "language.forward": lambda m, ids: m.language(input_ids=ids),
    "prepare_inputs_embeds": lambda m, ids: m.prepare_inputs_embeds(ids),
    "incremental_prefilling": lambda m, ids: m.incremental_prefilling(input_ids=ids),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad_id, message", OUT_OF_VOCAB, ids=["negative", "vocab_size"])
def test_input_ids_outside_the_vocabulary(model, entry, bad_id, message):
    ids = torch.tensor([[0, 5, bad_id, 7]])
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](model, ids)


def test_input_ids_outside_the_vocabulary_with_embeds(model, batch):
    """generate with inputs_embeds and input_ids (the VLMEvalKit recipe) checks the ids too: they feed
    the repetition penalty."""
    embeds = model.prepare_inputs_embeds(batch.input_ids)
    ids = batch.input_ids.clone()
    ids[0, 3] = VOCAB + 7
    with pytest.raises(ValueError, match=r"input_ids holds the token id 2055, outside the vocabulary"):
        model.generate(inputs_embeds=embeds, input_ids=ids, max_new_tokens=2)


MODEL_CASES = [
    ("ids-float", lambda m, b: m.generate(input_ids=b.input_ids.float()),
     TypeError, r"input_ids must hold integer token ids, got dtype torch.float32"),
    ("ids-list", lambda m, b: m.generate(input_ids=b.input_ids.tolist()),
     TypeError, r"input_ids must be a torch.LongTensor \[batch, length\], got list"),
    ("ids-1d", lambda m, b: m.prepare_inputs_embeds(b.input_ids[0]),
     ValueError, r"input_ids must have shape \[batch, length\] with at least one token, got \(\d+,\)"),
    ("ids-empty", lambda m, b: m.generate(input_ids=b.input_ids[:, :0]),
     ValueError, r"input_ids must have shape \[batch, length\] with at least one token, got \(1, 0\)"),
    ("prefill-empty", lambda m, b: m.incremental_prefilling(input_ids=b.input_ids[:, :0]),
     ValueError, r"input_ids must have shape \[batch, length\] with at least one token"),
    ("embeds-2d", lambda m, b: m.generate(inputs_embeds=torch.zeros(3, 64)),
     ValueError, r"inputs_embeds has shape \(3, 64\); expected \[batch, length, 64\]"),
    ("embeds-width", lambda m, b: m.language.generate(inputs_embeds=torch.zeros(1, 3, 7)),
     ValueError, r"inputs_embeds has shape \(1, 3, 7\); expected \[batch, length, 64\]"),
    ("embeds-list", lambda m, b: m.incremental_prefilling(inputs_embeds=[[0.0] * 64]),
     TypeError, r"inputs_embeds must be a tensor \[batch, length, 64\], got list"),
    ("embeds-int", lambda m, b: m(inputs_embeds=torch.zeros(1, 2, 64, dtype=torch.long)),
     TypeError, r"inputs_embeds must be a floating-point tensor, got dtype torch.int64"),
    ("mask-list", lambda m, b: m.generate(input_ids=b.input_ids, attention_mask=b.attention_mask.tolist()),
     TypeError, r"attention_mask must be a tensor of shape \(1, \d+\), got list"),
    ("mask-empty-row", lambda m, b: m.generate(input_ids=b.input_ids, attention_mask=torch.zeros_like(b.attention_mask)),
     ValueError, r"attention_mask rows \[0\] are all zeros"),
    ("images-missing", lambda m, b: m.generate(input_ids=b.input_ids, images_seq_mask=b.images_seq_mask,
                                               images_spatial_crop=b.images_spatial_crop),
     ValueError, r"images_seq_mask marks image positions but images is None"),
    ("crop-missing", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, b.images_seq_mask),
     ValueError, r"images_seq_mask marks image positions but images_spatial_crop is None"),
    ("seq-mask-missing", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, None, b.images_spatial_crop),
     ValueError, r"images need images_seq_mask"),
    ("images-list", lambda m, b: m.prepare_inputs_embeds(b.input_ids, [b.images], b.images_seq_mask,
                                                         b.images_spatial_crop),
     TypeError, r"images must be a tensor \(as the processor returns it\), got list"),
    ("images-unbatched", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images[0], b.images_seq_mask,
                                                              b.images_spatial_crop),
     ValueError, r"images has shape \(2, 3, 384, 384\); expected \[1, tiles, 3, height, width\]"),
    ("crop-unbatched", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, b.images_seq_mask,
                                                            b.images_spatial_crop[0]),
     ValueError, r"images_spatial_crop has shape \(1, 2\); expected \[1, images, 2\]"),
    ("crop-too-many-tiles", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, b.images_seq_mask,
                                                                 torch.tensor([[[3, 3]]])),
     ValueError, r"batch row 0: images_spatial_crop \[\(3, 3\)\] needs 10 tiles but images holds 2 per row"),
    ("crop-negative", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, b.images_seq_mask,
                                                           torch.tensor([[[-1, 2]]])),
     ValueError, r"images_spatial_crop holds a negative tile count"),
    ("crop-no-image", lambda m, b: m.prepare_inputs_embeds(b.input_ids, b.images, b.images_seq_mask,
                                                           torch.zeros(1, 1, 2, dtype=torch.long)),
     ValueError, r"images_seq_mask marks image positions but images_spatial_crop lists no image"),
    ("seq-mask-short", lambda m, b: m.generate(input_ids=b.input_ids, images=b.images,
                                               images_seq_mask=b.images_seq_mask[:, 1:],
                                               images_spatial_crop=b.images_spatial_crop),
     ValueError, r"images_seq_mask has shape \(1, \d+\); expected \(1, \d+\) like input_ids"),
    ("position-ids-shape", lambda m, b: m(input_ids=b.input_ids[:, :3], position_ids=torch.arange(4)[None]),
     ValueError, r"position_ids has shape \(1, 4\); expected \(1, 3\)"),
    ("labels-shape", lambda m, b: m.language(input_ids=b.input_ids[:, :3], labels=b.input_ids[:, :2]),
     ValueError, r"labels has shape \(1, 2\); expected \(1, 3\) \(one label per input position\)"),
    ("past-str", lambda m, b: m.generate(input_ids=b.input_ids[:, :4], past_key_values="cache"),
     TypeError, r"past_key_values must be a KVCache or one \(keys, values\) pair .* per layer, got str"),
    ("past-layers", lambda m, b: m.generate(input_ids=b.input_ids[:, :4], past_key_values=[(torch.zeros(1, 4, 2, 16),) * 2]),
     ValueError, r"past_key_values has 1 layers, the model has 3"),
    ("past-not-pairs", lambda m, b: m.language(input_ids=b.input_ids[:, :4], past_key_values=[1, 2, 3]),
     TypeError, r"past_key_values\[0\] must be a pair of 4-D tensors"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in MODEL_CASES],
                         ids=[case[0] for case in MODEL_CASES])
def test_model_bad_input(model, batch, call, error, message):
    with pytest.raises(error, match=message):
        call(model, batch)


# ---- generate's arguments -------------------------------------------------------------------------

GENERATE_CASES = [
    ("max-new-tokens-0", dict(max_new_tokens=0), ValueError, r"max_new_tokens must be >= 1, got 0"),
    ("max-new-tokens-negative", dict(max_new_tokens=-3), ValueError, r"max_new_tokens must be >= 1, got -3"),
    ("max-new-tokens-float", dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an integer, got float 2.5"),
    ("max-new-tokens-str", dict(max_new_tokens="8"), TypeError, r"max_new_tokens must be an integer, got str '8'"),
    ("max-length-short", dict(max_new_tokens=None, max_length=5), ValueError,
     r"max_length=5 leaves no room for new tokens after the \d+-token prompt"),
    ("min-new-tokens-str", dict(min_new_tokens="1"), TypeError, r"min_new_tokens must be an integer, got str"),
    ("temperature-nan", dict(do_sample=True, temperature=float("nan")), ValueError,
     r"temperature must be > 0 when sampling \(do_sample=True\) and finite, got nan"),
    ("temperature-inf", dict(do_sample=True, temperature=float("inf")), ValueError,
     r"temperature must be > 0 when sampling .* and finite, got inf"),
    ("temperature-zero", dict(do_sample=True, temperature=0.0), ValueError,
     r"temperature must be > 0 when sampling .* got 0.0; use do_sample=False for greedy"),
    ("temperature-str", dict(do_sample=True, temperature="0.7"), TypeError, r"temperature must be a number, got str"),
    ("repetition-penalty-nan", dict(repetition_penalty=float("nan")), ValueError,
     r"repetition_penalty must be a finite number > 0 \(1.0: no penalty\), got nan"),
    ("repetition-penalty-inf", dict(repetition_penalty=float("inf")), ValueError,
     r"repetition_penalty must be a finite number > 0 .* got inf"),
    ("repetition-penalty-zero", dict(repetition_penalty=0), ValueError, r"repetition_penalty must be a finite number > 0"),
    ("repetition-penalty-str", dict(repetition_penalty="1.1"), TypeError, r"repetition_penalty must be a number, got str"),
    ("top-p-nan", dict(do_sample=True, top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\], got nan"),
    ("top-p-zero", dict(do_sample=True, top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ("top-p-str", dict(do_sample=True, top_p="0.9"), TypeError, r"top_p must be a number, got str"),
    ("top-k-float", dict(do_sample=True, top_k=2.5), TypeError, r"top_k must be an integer, got float 2.5"),
    ("top-k-nan", dict(do_sample=True, top_k=float("nan")), TypeError, r"top_k must be an integer, got float nan"),
    ("top-k-negative", dict(do_sample=True, top_k=-1), ValueError, r"top_k must be >= 0 \(0 disables it\), got -1"),
    ("eos-str", dict(eos_token_id="</s>"), TypeError, r"eos_token_id must be an integer, got str"),
    ("eos-outside-vocab", dict(eos_token_id=[1, VOCAB + 3]), ValueError,
     r"eos_token_id 2051 is outside the vocabulary \[0, 2048\); pass eos_token_id=\[\] to generate without"),
    ("pad-outside-vocab", dict(pad_token_id=-1), ValueError, r"pad_token_id -1 is outside the vocabulary \[0, 2048\)"),
    ("pad-str", dict(pad_token_id="<pad>"), TypeError, r"pad_token_id must be an integer, got str"),
    ("generator-int", dict(do_sample=True, generator=5), TypeError, r"generator must be a torch.Generator, got int"),
    ("logits-processor-entry", dict(logits_processor=[5]), TypeError, r"logits_processor\[0\] is a int, not a callable"),
    ("stopping-criteria-int", dict(stopping_criteria=5), TypeError, r"stopping_criteria must be a list of callables"),
    ("streamer-object", dict(streamer=object()), TypeError, r"streamer must have put\(\) and end\(\) methods"),
]


@pytest.mark.parametrize("kwargs, error, message", [case[1:] for case in GENERATE_CASES],
                         ids=[case[0] for case in GENERATE_CASES])
def test_generate_bad_arguments(model, batch, kwargs, error, message):
    kwargs = dict(dict(max_new_tokens=3), **kwargs)
    with pytest.raises(error, match=message):
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
                       images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
                       **kwargs)


def test_none_sampling_settings_mean_the_defaults(model, batch):
    """temperature / top_p / repetition_penalty None mean the defaults, as in transformers."""
    base = dict(inputs_embeds=model.prepare_inputs_embeds(batch.input_ids), max_new_tokens=4, eos_token_id=[])
    expected = model.generate(**base, do_sample=True, generator=torch.Generator().manual_seed(0))
    got = model.generate(**base, do_sample=True, temperature=None, top_p=None, repetition_penalty=None,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)


# ---- item 7: extreme sampling settings never give NaN / inf probabilities --------------------------

def logits(batch=2, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 8


def sampled(scores, draws=64):
    generator = torch.Generator().manual_seed(1)
    return torch.stack([choose_next(scores, True, generator) for _ in range(draws)])


@pytest.mark.parametrize("temperature", [1e-30, 1e-39, 1e-45, 1e-50, 5e-324])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (50, 1.0), (0, 0.9)], ids=["plain", "top_k", "top_p"])
def test_tiny_temperature_is_greedy(temperature, top_k, top_p):
    scores = logits()
    settings = SamplingSettings(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    processed = process_logits(scores, None, 0, settings)
    probs = processed.softmax(dim=-1)
    assert torch.isfinite(probs).all() and not unusable_rows(processed, True).any()
    assert torch.equal(probs.argmax(dim=-1), scores.argmax(dim=-1))
    assert torch.allclose(probs.max(dim=-1).values, torch.ones(2))
    assert (sampled(processed) == scores.argmax(dim=-1)).all()


def test_tiny_temperature_keeps_ties():
    scores = logits(batch=1)
    top = scores.argmax().item()
    scores[0, 7 if top != 7 else 8] = scores[0, top]
    processed = process_logits(scores, None, 0, SamplingSettings(do_sample=True, temperature=1e-40, top_k=0))
    probs = processed.softmax(dim=-1)[0]
    assert torch.isfinite(probs).all()
    assert sorted(probs.nonzero().flatten().tolist()) == sorted([top, 7 if top != 7 else 8])
    assert torch.allclose(probs[top], torch.tensor(0.5))


@pytest.mark.parametrize("temperature", [1e30, 1e300])
def test_huge_temperature_is_uniform_and_keeps_masked_tokens_out(temperature):
    """With min_new_tokens, EOS is -inf before the temperature (-inf / inf would be NaN)."""
    scores = logits()
    settings = SamplingSettings(do_sample=True, temperature=temperature, top_k=0, min_new_tokens=5, eos_token_ids=(3,))
    probs = process_logits(scores, None, 0, settings).softmax(dim=-1)
    assert torch.isfinite(probs).all()
    assert (probs[:, 3] == 0).all()
    assert torch.allclose(probs[:, :3], torch.full((2, 3), 1 / 49))
    assert 3 not in sampled(process_logits(scores, None, 0, settings)).tolist()


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("penalty", [1e-30, 1e-300])
def test_tiny_repetition_penalty_picks_the_best_repeated_token(do_sample, penalty):
    scores = logits(batch=1)
    scores[0, 10], scores[0, 11], scores[0, 12], scores[0, 13] = 5.0, 7.0, 0.0, -4.0
    history = torch.tensor([[10, 11, 12, 13, 11]])
    settings = SamplingSettings(do_sample=do_sample, repetition_penalty=penalty, top_k=0)
    processed = process_logits(scores, history, 0, settings)
    assert not torch.isnan(processed).any() and not unusable_rows(processed, do_sample).any()
    assert torch.isfinite(processed.softmax(dim=-1)).all()
    assert choose_next(processed, False).tolist() == [11]
    if do_sample:
        assert (sampled(processed) == 11).all()


def test_tiny_repetition_penalty_without_overflow_is_unchanged():
    """Rows where nothing overflows get exactly transformers' values; a zero score stays 0 (0 / 0 when
    the penalty underflows to 0 in float32 would be NaN)."""
    scores = logits(batch=1)
    scores[0, 12] = 0.0
    history = torch.tensor([[12, 13]])
    small = process_logits(scores, history, 0, SamplingSettings(repetition_penalty=0.5))
    expected = scores.clone()
    seen = expected[0, 13]
    expected[0, 13] = seen * 0.5 if seen < 0 else seen / 0.5
    assert torch.equal(small, expected)
    scores[0, 12:] = -1.0  # every seen score negative, one zero: no overflow possible
    scores[0, 12] = 0.0
    tiny = process_logits(scores, history, 0, SamplingSettings(repetition_penalty=1e-300))
    assert tiny[0, 12] == 0 and tiny[0, 13] == 0 and torch.isfinite(tiny).all()


def test_huge_repetition_penalty_rules_out_repeats():
    scores = logits(batch=1)
    scores[0, 4], scores[0, 5] = -2.0, 3.0
    settings = SamplingSettings(do_sample=True, repetition_penalty=1e300, top_k=0)
    processed = process_logits(scores, torch.tensor([[4, 5]]), 0, settings)
    probs = processed.softmax(dim=-1)
    assert torch.isfinite(probs).all()
    assert processed[0, 4] == -float("inf") and processed[0, 5] == 0  # -2 * 1e300 and 3 / 1e300
    assert probs[0, 4] == 0 and 4 not in sampled(processed).flatten().tolist()


def test_choose_next_never_samples_from_nan():
    scores = logits()
    scores[1, 5] = float("nan")
    assert unusable_rows(scores, True).tolist() == [False, True]
    assert unusable_rows(torch.full((1, 4), -float("inf")), False).tolist() == [True]
    tokens = sampled(scores)  # no RuntimeError from multinomial; row 1 is reported by generate instead
    assert ((tokens >= 0) & (tokens < 50)).all()


def test_extreme_settings_end_to_end(model, batch):
    embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                         batch.images_spatial_crop)
    base = dict(inputs_embeds=embeds, input_ids=batch.input_ids, max_new_tokens=6, eos_token_id=[])
    greedy = model.generate(**base)
    tiny_temperature = model.generate(**base, do_sample=True, temperature=1e-39, top_k=0,
                                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_temperature, greedy)
    for penalty in (1e-300, 1e300):
        out = model.generate(**base, do_sample=True, repetition_penalty=penalty, top_k=0, return_dict_in_generate=True,
                             output_scores=True, generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(step.softmax(dim=-1)).all() for step in out.scores)
        new = out.sequences[0, batch.input_ids.shape[1]:]
        assert new.shape == (6,) and ((new >= 0) & (new < VOCAB)).all()


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_logits_raise_naming_step_and_row(model, batch, do_sample):
    embeds = model.prepare_inputs_embeds(batch.input_ids).repeat(2, 1, 1)
    embeds[1, -1] = float("nan")
    with pytest.raises(ValueError, match=r"generation step 0: the scores of batch rows \[1\] hold NaN or inf"):
        model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=do_sample)


def test_a_processor_masking_every_token_raises(model, batch):
    embeds = model.prepare_inputs_embeds(batch.input_ids)

    def mask_all_from_step_2(ids, scores):
        return scores.fill_(-float("inf")) if ids.shape[1] >= 2 else scores

    with pytest.raises(ValueError, match=r"generation step 2: the scores of batch rows \[0\] .*mask every token"):
        model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=True, eos_token_id=[],
                       logits_processor=[mask_all_from_step_2])


# ---- ChatEngine's GenerationParams --------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), r"GenerationParams.temperature must be a finite number, got nan"),
    (dict(top_p="0.9"), r"GenerationParams.top_p must be a finite number, got '0.9'"),
    (dict(repetition_penalty=float("inf")), r"GenerationParams.repetition_penalty must be a finite number"),
    (dict(max_new_tokens=0), r"GenerationParams.max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=2.0), r"GenerationParams.max_new_tokens must be an int >= 1, got 2.0"),
    (dict(seed=1.5), r"GenerationParams.seed must be an int or None, got 1.5"),
    (dict(seed=2 ** 64), r"GenerationParams.seed must fit in 64 bits \(-9223372036854775808 to 18446744073709551615\), "
                         r"got 18446744073709551616"),
    (dict(seed=-(2 ** 63) - 1), r"GenerationParams.seed must fit in 64 bits"),
    (dict(stop="User:"), r"GenerationParams.stop must be a list of strings, got 'User:'"),
], ids=["temperature-nan", "top-p-str", "penalty-inf", "max-new-tokens-0", "max-new-tokens-float", "seed-float",
        "seed-above-64-bits", "seed-below-64-bits", "stop-str"])
def test_generation_params_bad_values(kwargs, message):
    from deepseek_vl2.engine import GenerationParams

    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)
