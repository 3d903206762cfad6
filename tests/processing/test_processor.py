"""DeepseekVLV2Processor end to end: the golden fixtures (tests/fixtures), samples, batches, errors.

Tiling, token counting and tokenizer set-up have their own files next to this one."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from deepseek_vl2.models.processing_deepseek_vl_v2 import (
    BatchCollateOutput,
    DeepseekVLV2Processor,
    VLChatProcessorOutput,
)
from deepseek_vl2.utils.io import load_pil_images

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPEC = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in SPEC["cases"]}
TOKENIZER_CASE = next(c for c in SPEC["cases"] if c["kind"] == "tokenizer")
SINGLE_CASES = [name for name, case in CASES.items() if case["kind"] == "single"]
BATCH_CASES = [name for name, case in CASES.items() if case["kind"] == "batch"]
PIXEL_TOL = SPEC["tolerances"]["pixel_abs"]

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def checkpoint_dir(checkpoint):
    return FIXTURES / SPEC["checkpoints"][checkpoint]["dir"]


@functools.cache
def cached_processor(checkpoint):
    return DeepseekVLV2Processor.from_pretrained(str(checkpoint_dir(checkpoint)))


def fresh_processor(checkpoint="tiny_mha", **overrides):
    """A processor of its own, for tests that change settings."""
    return DeepseekVLV2Processor.from_pretrained(str(checkpoint_dir(checkpoint)), **overrides)


@pytest.fixture(scope="module")
def proc():
    return cached_processor("tiny_mha")


def absolute_conversation(conversation):
    result = []
    for message in conversation:
        message = dict(message)
        if "images" in message:
            message["images"] = [str(FIXTURES / path) for path in message["images"]]
        result.append(message)
    return result


def golden_tiles(pixels, u8_key, zero_tiles, checkpoint):
    """Float tiles from the stored uint8 tiles: (u8/255 - mean)/std, zero padding tiles."""
    config = json.loads((checkpoint_dir(checkpoint) / "processor_config.json").read_text())
    mean = torch.tensor(config["image_mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config["image_std"], dtype=torch.float32).view(3, 1, 1)
    tiles = (torch.from_numpy(pixels[u8_key]).to(torch.float32).div(255) - mean) / std
    tiles[zero_tiles] = 0
    return tiles


def max_abs_err(a, b):
    return (a - b).abs().max().item()


@functools.cache
def single_case_outputs(name):
    """(batched output, unbatched output, golden tensors, golden pixels) of a single case."""
    case = CASES[name]
    processor = cached_processor(case["checkpoint"])
    conversation = absolute_conversation(case["conversation"])
    images = load_pil_images(conversation)
    kwargs = dict(case["processor_kwargs"])
    kwargs["force_batchify"] = True
    batched = processor(conversations=conversation, images=images, **kwargs)
    kwargs["force_batchify"] = False
    single = processor(conversations=conversation, images=images, **kwargs)
    with np.load(FIXTURES / case["pixels_file"]) as archive:
        pixels = {key: archive[key] for key in archive.files}
    return batched, single, load_file(FIXTURES / case["expected_file"]), pixels


# --------------------------------------------------------------------------- p01..p08 single cases


@pytest.mark.parametrize("name", SINGLE_CASES)
def test_single_case_tokens(name):
    out, _, gold, _ = single_case_outputs(name)
    expected = CASES[name]["expected"]
    assert isinstance(out, BatchCollateOutput)
    assert out.sft_format == expected["sft_format"]
    assert out.seq_lens == expected["seq_lens"]
    assert out.input_ids.dtype == torch.long
    assert torch.equal(out.input_ids, gold["input_ids"])
    assert out.attention_mask.dtype == torch.bool
    assert torch.equal(out.attention_mask, gold["attention_mask"].bool())
    assert out.images_seq_mask.dtype == torch.bool
    assert torch.equal(out.images_seq_mask, gold["images_seq_mask"].bool())
    assert out.images_spatial_crop.dtype == torch.long
    assert torch.equal(out.images_spatial_crop, gold["images_spatial_crop"])
    assert torch.equal(out.labels, gold["labels"])


@pytest.mark.parametrize("name", SINGLE_CASES)
def test_single_case_pixels(name):
    out, _, _, pixels = single_case_outputs(name)
    case = CASES[name]
    expected = case["expected"]
    assert list(out.images.shape) == expected["images_shape"]
    assert out.images.dtype == torch.float32
    gold = golden_tiles(pixels, "tiles_u8", expected["zero_tiles"], case["checkpoint"])
    assert max_abs_err(out.images[0], gold) <= PIXEL_TOL
    for tile in expected["zero_tiles"]:
        assert torch.count_nonzero(out.images[0, tile]) == 0
    if "images_f32" in pixels:
        assert max_abs_err(out.images[0], torch.from_numpy(pixels["images_f32"])) <= PIXEL_TOL


@pytest.mark.parametrize("name", SINGLE_CASES)
def test_single_case_process_one(name):
    _, single, gold, _ = single_case_outputs(name)
    expected = CASES[name]["expected"]
    assert isinstance(single, VLChatProcessorOutput)
    assert single.num_image_tokens == expected["num_image_tokens"]
    assert torch.equal(single.target_ids, gold["target_ids"])
    assert len(single) == expected["seq_lens"][0]
    assert single.sft_format == expected["sft_format"][0]
    assert single.images_seq_mask.dtype == torch.bool
    assert int(single.images_seq_mask.sum()) == sum(expected["num_image_tokens"])


# --------------------------------------------------------------------------- p09 batch


@pytest.mark.parametrize("name", BATCH_CASES)
def test_batch_case(name):
    case = CASES[name]
    expected = case["expected"]
    processor = cached_processor(case["checkpoint"])
    gold = load_file(FIXTURES / case["expected_file"])
    with np.load(FIXTURES / case["pixels_file"]) as archive:
        pixels = {key: archive[key] for key in archive.files}

    samples = []
    for i, sample_case in enumerate(case["samples"]):
        conversation = absolute_conversation(sample_case["conversation"])
        sample = processor(conversations=conversation, images=load_pil_images(conversation),
                           **sample_case["processor_kwargs"])
        assert torch.equal(sample.input_ids, gold[f"s{i}.input_ids"][0])
        assert torch.equal(sample.target_ids, gold[f"s{i}.target_ids"])
        assert sample.num_image_tokens == expected["samples"][i]["num_image_tokens"]
        samples.append(sample)

    batch = processor.batchify(samples, **case["batchify"])
    assert list(batch.input_ids.shape) == expected["batch_shape"]
    assert torch.equal(batch.input_ids, gold["batch_input_ids"])
    assert batch.attention_mask.dtype == torch.bool
    assert torch.equal(batch.attention_mask, gold["batch_attention_mask"].bool())
    assert batch.images_seq_mask.dtype == torch.bool  # docs/deviations.md#padded-batches-keep-boolean-masks
    assert torch.equal(batch.images_seq_mask, gold["batch_images_seq_mask"].bool())
    assert torch.equal(batch.images_spatial_crop, gold["batch_images_spatial_crop"])
    assert torch.equal(batch.labels, gold["batch_labels"])
    assert batch.seq_lens == [s["seq_lens"][0] for s in expected["samples"]]
    assert batch.sft_format == [s["sft_format"][0] for s in expected["samples"]]
    assert list(batch.images.shape) == expected["batch_images_shape"]
    for i, sample_expected in enumerate(expected["samples"]):
        tiles = golden_tiles(pixels, f"s{i}_tiles_u8", sample_expected["zero_tiles"], case["checkpoint"])
        assert max_abs_err(batch.images[i, :len(tiles)], tiles) <= PIXEL_TOL
        assert torch.count_nonzero(batch.images[i, len(tiles):]) == 0


def test_right_padding():
    case = CASES[BATCH_CASES[0]]
    processor = cached_processor(case["checkpoint"])
    samples = []
    for sample_case in case["samples"]:
        conversation = absolute_conversation(sample_case["conversation"])
        samples.append(processor(conversations=conversation, images=load_pil_images(conversation),
                                 force_batchify=False))
    batch = processor.batchify(samples, padding="right")
    short, long_ = samples
    n = len(short)
    assert torch.equal(batch.input_ids[0, :n], short.input_ids)
    assert torch.all(batch.input_ids[0, n:] == processor.pad_id)
    assert torch.equal(batch.labels[0, :n], short.target_ids)
    assert torch.all(batch.labels[0, n:] == processor.ignore_id)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask[0].tolist() == [True] * n + [False] * (len(long_) - n)
    assert batch.attention_mask[1].all()
    assert batch.images_seq_mask.dtype == torch.bool
    assert not batch.images_seq_mask[0].any()
    assert torch.equal(batch.images_seq_mask[1], long_.images_seq_mask)
    assert torch.equal(batch.input_ids[1], long_.input_ids)
    with pytest.raises(ValueError, match="padding must be 'left' or 'right'"):
        processor.batchify(samples, padding="middle")


def test_left_padding_masks_every_pad_label(proc):
    # Kept from the official package (docs/deviations.md#kept-on-purpose): after left padding,
    # every label equal to pad_id becomes ignore_id
    with_pad = proc(prompt="a<｜▁pad▁｜>b", force_batchify=False)
    assert proc.pad_id in with_pad.target_ids.tolist()
    longer = proc(prompt="a much longer prompt than the other one", force_batchify=False)
    left = proc.batchify([with_pad, longer])
    assert proc.pad_id in left.input_ids[0, -len(with_pad):].tolist()
    assert proc.pad_id not in left.labels.tolist()[0]
    right = proc.batchify([with_pad, longer], padding="right")
    assert torch.equal(right.labels[0, :len(with_pad)], with_pad.target_ids)


def test_unused_images_are_refused(proc):
    # The reference ignores images beyond the <image> tags on the conversation path (and still
    # counts them for the <= 2 tiling rule). This package makes that an error, as on the prompt
    # path, so the tiling rule now always counts the images that are used
    # (docs/deviations.md#more-images-than-image-tags-are-refused).
    images = [Image.new("RGB", (640, 480)) for _ in range(3)]
    conversation = [{"role": USER, "content": "<image>\nhi"}, {"role": ASSISTANT, "content": ""}]
    with pytest.raises(ValueError, match=r"1 <image> tags but 3 images were given"):
        proc(conversations=conversation, images=images, force_batchify=False)


# --------------------------------------------------------------------------- other behaviour


def test_prompt_path_matches_conversation_path():
    name = "p01_single_640x480"
    out, _, gold, _ = single_case_outputs(name)
    processor = cached_processor(CASES[name]["checkpoint"])
    images = load_pil_images(absolute_conversation(CASES[name]["conversation"]))
    from_prompt = processor(prompt=out.sft_format[0], images=images)
    assert torch.equal(from_prompt.input_ids, gold["input_ids"])
    assert torch.equal(from_prompt.labels, gold["labels"])
    assert torch.equal(from_prompt.images, out.images)
    formatted = processor(prompt="<image>\nDescribe this image.", images=images, apply_sft_format=True)
    assert formatted.sft_format == out.sft_format
    assert torch.equal(formatted.input_ids, gold["input_ids"])


def test_prompt_without_images(proc):
    # docs/deviations.md#images-set-to-none-means-no-images
    out = proc(prompt="Hello world!", images=None, force_batchify=False)
    assert out.input_ids.tolist() == [proc.bos_id] + proc.encode("Hello world!", bos=False)
    assert out.images.shape == (1, 3, 384, 384) and torch.count_nonzero(out.images) == 0
    assert out.images_spatial_crop.tolist() == [[0, 0]]
    assert out.num_image_tokens == []


def test_inference_mode_false_keeps_eos(proc):
    conversation = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello."}]
    out = proc(conversations=conversation, inference_mode=False, force_batchify=False)
    assert out.input_ids[-1].item() == proc.eos_id
    answer = proc.encode("Hello.", bos=False, eos=True)
    assert out.input_ids[-len(answer):].tolist() == answer  # no space before the answer (kept on purpose)
    assert out.target_ids[-len(answer):].tolist() == answer


def test_system_prompt_is_display_only(proc):
    conversation = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": ""}]
    plain = proc(conversations=conversation, force_batchify=False)
    with_system = proc(conversations=conversation, system_prompt="You are a helpful assistant.",
                       force_batchify=False)
    assert with_system.sft_format == "You are a helpful assistant.\n\n<|User|>: Hi\n\n<|Assistant|>:"
    assert torch.equal(with_system.input_ids, plain.input_ids)


def test_system_message_is_encoded_after_bos(proc):
    system = "Be brief."
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": ""}]
    out = proc(conversations=conversation, force_batchify=False)
    system_ids = proc.encode(system, bos=False)
    user_ids = proc.encode("<|User|>: Hi\n\n<|Assistant|>:", bos=False)
    assert out.input_ids.tolist() == [proc.bos_id] + system_ids + user_ids


def test_mask_prompt_labels():
    processor = fresh_processor(mask_prompt=True)
    conversation = absolute_conversation(CASES["p08_multi_turn"]["conversation"])
    out = processor(conversations=conversation, images=load_pil_images(conversation), force_batchify=False)
    kept = out.target_ids[out.target_ids != processor.ignore_id].tolist()
    assert kept == [processor.bos_id] + processor.encode("A red circle and a blue square.", bos=False, eos=True)


def test_to_moves_and_casts_images(proc):
    out = proc(prompt="<image>", images=[Image.new("RGB", (64, 64))])
    assert out.images.dtype == torch.float32
    assert out.to("cpu") is out
    assert out.images.dtype == torch.bfloat16
    assert out.input_ids.dtype == torch.long and out.attention_mask.dtype == torch.bool
    assert out.images_seq_mask.dtype == torch.bool and out.images_spatial_crop.dtype == torch.long
    out.to(torch.device("cpu"), dtype=torch.float32)
    assert out.images.dtype == torch.float32


def test_outputs_unpack_like_dicts(proc):
    out = proc(prompt="Hi")

    def capture(**kwargs):
        return kwargs

    unpacked = capture(**out)
    assert set(unpacked) == {"sft_format", "input_ids", "labels", "images", "attention_mask",
                             "images_seq_mask", "images_spatial_crop", "seq_lens"}
    assert unpacked["input_ids"] is out.input_ids
    assert out["seq_lens"] == [len(proc.encode("Hi"))]
    out["sft_format"] = ["changed"]
    assert out.sft_format == ["changed"]
    single = proc(prompt="Hi", force_batchify=False)
    assert set(capture(**single)) == {"sft_format", "input_ids", "target_ids", "images",
                                      "images_seq_mask", "images_spatial_crop", "num_image_tokens"}


def test_call_is_keyword_only(proc):
    with pytest.raises(TypeError):
        proc("Hi")


def test_save_and_reload(tmp_path, proc):
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "DeepseekVLV2Processor"
    assert config["candidate_resolutions"][0] == [384, 384]
    reloaded = DeepseekVLV2Processor.from_pretrained(str(tmp_path))
    assert len(reloaded.tokenizer) == len(proc.tokenizer)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id, reloaded.image_token_id) == \
        (proc.bos_id, proc.eos_id, proc.pad_id, proc.image_token_id)
    for probe in TOKENIZER_CASE["probes"]:
        assert reloaded.encode(probe["text"], bos=False) == probe["ids"]
    assert reloaded.mask_prompt == proc.mask_prompt and reloaded.sft_format == proc.sft_format


# --------------------------------------------------------------------------- clear errors


def one_turn(content):
    return [{"role": USER, "content": content}, {"role": ASSISTANT, "content": ""}]


def test_error_image_count_prompt(proc):
    with pytest.raises(ValueError, match=r"1 <image> tags but 0 images"):
        proc(prompt="<image>\nHi", images=[])
    with pytest.raises(ValueError, match=r"1 <image> tags but 2 images"):
        proc(prompt="<image>\nHi", images=[Image.new("RGB", (8, 8))] * 2)


def test_error_image_count_conversation(proc):
    with pytest.raises(ValueError, match=r"2 <image> tags but 1 images"):
        proc(conversations=one_turn("<image><image>"), images=[Image.new("RGB", (8, 8))])


def test_error_unknown_role(proc):
    with pytest.raises(ValueError, match=r"unknown role 'bot'.*allowed roles.*'<\|User\|>'"):
        proc(conversations=[{"role": "bot", "content": "x"}, {"role": ASSISTANT, "content": ""}])


def test_error_system_not_first(proc):
    conversation = one_turn("Hi")
    conversation.insert(1, {"role": "system", "content": "late"})
    with pytest.raises(ValueError, match=r"message 1 has role 'system'.*only allowed as the first"):
        proc(conversations=conversation)


def test_error_image_in_assistant(proc):
    conversation = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "<image>"},
                    {"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": ""}]
    with pytest.raises(ValueError, match=r"message 1 .*contains <image>"):
        proc(conversations=conversation, images=[Image.new("RGB", (8, 8))])


def test_error_missing_final_assistant_turn(proc):
    with pytest.raises(ValueError, match=r"must end with an assistant.*'content': ''"):
        proc(conversations=[{"role": USER, "content": "Hi"}])


def test_error_prompt_and_conversations(proc):
    with pytest.raises(ValueError, match=r"exactly one of `prompt` and `conversations` \(both"):
        proc(prompt="Hi", conversations=one_turn("Hi"))
    with pytest.raises(ValueError, match=r"exactly one of `prompt` and `conversations` \(neither"):
        proc(images=[])
    with pytest.raises(ValueError, match="`conversations` is empty"):
        proc(conversations=[])


def test_error_bad_images(proc, monkeypatch):
    with pytest.raises(ValueError, match=r"image 0 is a str, expected a PIL.Image.Image"):
        proc(prompt="<image>", images=["photo.png"])
    with pytest.raises(ValueError, match="got a single image; wrap it in a list"):
        proc(prompt="<image>", images=Image.new("RGB", (8, 8)))
    broken = Image.new("L", (8, 8))

    def refuse(*args, **kwargs):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(broken, "convert", refuse)
    with pytest.raises(ValueError, match=r"image 0 \(mode 'L'\) cannot be converted to RGB"):
        proc(prompt="<image>", images=[broken])


def test_process_one_from_several_threads_equals_one_at_a_time(proc):
    """The server prepares requests in a thread pool: calls from several threads at once give what
    each gives alone (the tokenizer calls take turns, the tiling runs side by side)."""
    import threading

    cases = [(f"Describe picture {i} in {i + 2} words.", Image.new("RGB", (200 + 90 * i, 300), (40 * i, 90, 200)))
             for i in range(6)]

    def prepare(text, image):
        conversation = [{"role": "<|User|>", "content": "<image>\n" + text}, {"role": "<|Assistant|>", "content": ""}]
        return proc.process_one(conversations=conversation, images=[image], system_prompt="")

    alone = [prepare(*case) for case in cases]
    together = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def run(index):
        barrier.wait()
        together[index] = prepare(*cases[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(alone, together):
        assert torch.equal(one.input_ids, other.input_ids) and torch.equal(one.images, other.images)


@pytest.mark.parametrize("key, value, expected", [
    ("patch_size", "14", "a positive integer, got '14'"),
    ("patch_size", 0, "a positive integer, got 0"),
    ("downsample_ratio", 0, "a positive number, got 0"),
    ("image_mean", [0.5], r"a list of 3 numbers \(one per RGB channel\), got \[0.5\]"),
    ("image_std", [0.5, 0, 0.5], r"a list of 3 positive numbers \(one per RGB channel\), got \[0.5, 0, 0.5\]"),
    ("image_token", 5, "a non-empty string, got 5"),
    ("sft_format", "chatml", r"the name of a conversation template \(.*deepseek.*\), got 'chatml'"),
    ("candidate_resolutions", [[384, "384"]],
     r"a non-empty list of \(width, height\) pairs of positive integers, got \[\[384, '384'\]\]"),
    ("normalize", "yes", "true or false, got 'yes'"),
])
def test_error_unusable_processor_config_value(tmp_path, key, value, expected):
    source = checkpoint_dir("tiny_mha")
    for path in source.iterdir():
        if path.suffix == ".json" and path.name != "config.json":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"processor_config\.json: {key} must be {expected}"):
        DeepseekVLV2Processor.from_pretrained(str(tmp_path))


def test_error_unusable_from_pretrained_argument():
    with pytest.raises(ValueError, match="from_pretrained argument downsample_ratio must be a positive number, got 0"):
        DeepseekVLV2Processor.from_pretrained(str(checkpoint_dir("tiny_mha")), downsample_ratio=0)
