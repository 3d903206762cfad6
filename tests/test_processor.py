"""DeepseekVLV2Processor against the golden fixtures (tests/fixtures) and the spec tables."""

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
    select_best_resolution,
)
from deepseek_vl2.utils.io import load_pil_images

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in SPEC["cases"]}
TOKENIZER_CASE = next(c for c in SPEC["cases"] if c["kind"] == "tokenizer")
SINGLE_CASES = [name for name, case in CASES.items() if case["kind"] == "single"]
BATCH_CASES = [name for name, case in CASES.items() if case["kind"] == "batch"]
PIXEL_TOL = SPEC["tolerances"]["pixel_abs"]

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def checkpoint_dir(checkpoint):
    return FIXTURES / SPEC["checkpoints"][checkpoint]["dir"]


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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


# --------------------------------------------------------------------------- p00 tokenizer


@pytest.mark.parametrize("checkpoint", TOKENIZER_CASE["checkpoints"])
def test_special_ids(checkpoint):
    processor = cached_processor(checkpoint)
    expected = SPEC["checkpoints"][checkpoint]["expected_ids"]
    assert processor.bos_id == expected["bos_id"]
    assert processor.eos_id == expected["eos_id"]
    assert processor.pad_id == expected["pad_id"]
    assert processor.image_token_id == expected["image_token_id"]
    assert len(processor.tokenizer) == expected["tokenizer_length"]
    assert processor.tokenizer.padding_side == "left"
    token_ids = {k: v for k, v in expected.items()
                 if k not in ("bos_id", "eos_id", "pad_id", "image_token_id", "tokenizer_length")}
    assert len(token_ids) == 11
    for token, token_id in token_ids.items():
        assert processor.encode(token, bos=False, eos=False) == [token_id], token


@pytest.mark.parametrize("checkpoint", TOKENIZER_CASE["checkpoints"])
def test_encode_decode_probes(checkpoint):
    processor = cached_processor(checkpoint)
    for probe in TOKENIZER_CASE["probes"]:
        assert processor.encode(probe["text"], bos=False, eos=False) == probe["ids"], probe["text"]
        assert processor.decode(probe["ids"]) == probe["decoded"]
    first = TOKENIZER_CASE["probes"][0]
    assert processor.encode(first["text"]) == [processor.bos_id] + first["ids"]
    assert processor.encode(first["text"], bos=False, eos=True) == first["ids"] + [processor.eos_id]


def test_special_tokens_are_exact_match_specials(proc):
    for token in ["<|User|>", "<|Assistant|>", "<|ref|>", "<|grounding|>", "<image>"]:
        added = proc.tokenizer.added_tokens_decoder[proc.tokenizer.convert_tokens_to_ids(token)]
        assert (added.special, added.normalized, added.lstrip, added.rstrip) == (True, False, False, False)
    # no whitespace absorbed around a special token
    assert proc.encode(" <|User|> ", bos=False) == proc.encode(" ", bos=False) + [2006] + proc.encode(" ", bos=False)


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
    assert batch.images_seq_mask.dtype == torch.bool  # P-PROC-4 fixed
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
    # P-PROC-12 (kept): after left padding, every label equal to pad_id becomes ignore_id
    with_pad = proc(prompt="a<｜▁pad▁｜>b", force_batchify=False)
    assert proc.pad_id in with_pad.target_ids.tolist()
    longer = proc(prompt="a much longer prompt than the other one", force_batchify=False)
    left = proc.batchify([with_pad, longer])
    assert proc.pad_id in left.input_ids[0, -len(with_pad):].tolist()
    assert proc.pad_id not in left.labels.tolist()[0]
    right = proc.batchify([with_pad, longer], padding="right")
    assert torch.equal(right.labels[0, :len(with_pad)], with_pad.target_ids)


# --------------------------------------------------------------------------- tiling tables

# processor.md §3: (W, H) -> best, (nw, nh), tiles incl. global, tokens, global content, local content
TILING_TABLE = [
    ((300, 200), (384, 384), (1, 1), 2, 421, (384, 256), (384, 256)),
    ((384, 384), (384, 384), (1, 1), 2, 421, (384, 384), (384, 384)),
    ((640, 480), (768, 768), (2, 2), 5, 1023, (384, 288), (768, 576)),
    ((800, 600), (1152, 768), (3, 2), 7, 1415, (384, 288), (1024, 768)),
    ((1024, 1024), (1152, 1152), (3, 3), 10, 2017, (384, 384), (1152, 1152)),
    ((1280, 720), (1536, 768), (4, 2), 9, 1807, (384, 216), (1365, 768)),
    ((1920, 1080), (1536, 768), (4, 2), 9, 1807, (384, 216), (1365, 768)),
    ((500, 2000), (384, 1536), (1, 4), 5, 1051, (96, 384), (384, 1536)),
    ((3000, 400), (3072, 384), (8, 1), 9, 1793, (384, 51), (2880, 384)),
    ((4000, 3000), (1152, 1152), (3, 3), 10, 2017, (384, 288), (1152, 864)),
]


def content_size(view):
    """(width, height) of the white area in a normalised view padded with grey."""
    white = view[0] > 0.5
    return int(white.any(0).sum()), int(white.any(1).sum())


@pytest.mark.parametrize("row", TILING_TABLE, ids=lambda row: f"{row[0][0]}x{row[0][1]}")
def test_tiling_worked_examples(proc, row):
    size, best, grid, n_tiles, n_tokens, global_content, local_content = row
    assert select_best_resolution(size, proc.candidate_resolutions) == best
    image = Image.new("RGB", size, (255, 255, 255))
    ids, tiles, seq_mask, crops, counts = proc.tokenize_with_images("<image>", [image], bos=False, eos=False)
    assert crops == [list(grid)]
    assert len(tiles) == n_tiles
    assert counts == [n_tokens] and len(ids) == n_tokens and all(seq_mask)
    assert content_size(tiles[0]) == global_content
    nw, nh = grid
    local = torch.stack(tiles[1:]).view(nh, nw, 3, 384, 384).permute(2, 0, 3, 1, 4).reshape(3, nh * 384, nw * 384)
    assert content_size(local) == local_content
    if local_content != (nw * 384, nh * 384):  # centred content: the corner is pad colour 127
        assert torch.allclose(local[:, 0, 0], torch.full((3,), (127 / 255 - 0.5) / 0.5))


def test_local_tiles_are_row_major(proc):
    # 768x768 image with four coloured quadrants -> 2x2 grid, tiles in row-major order
    image = Image.new("RGB", (768, 768))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for (x, y), colour in zip([(0, 0), (384, 0), (0, 384), (384, 384)], colours):
        image.paste(colour, (x, y, x + 384, y + 384))
    _, tiles, _, crops, _ = proc.tokenize_with_images("<image>", [image], bos=False, eos=False)
    assert crops == [[2, 2]]
    for tile, colour in zip(tiles[1:], colours):
        expected = (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.5
        assert torch.equal(tile[:, 192, 192], expected)


def test_select_best_resolution_ties_keep_first():
    assert select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution((100, 100), [(768, 384), (384, 384)]) == (384, 384)
    # exact-size images choose their own candidate
    assert select_best_resolution((384, 3456), [(384, 384), (384, 3456), (3456, 384)]) == (384, 3456)


# processor.md §5: image tokens per candidate resolution
TOKENS_PER_CANDIDATE = {
    (384, 384): 421, (384, 768): 631, (768, 384): 617, (384, 1152): 841, (1152, 384): 813,
    (384, 1536): 1051, (1536, 384): 1009, (768, 768): 1023, (384, 1920): 1261, (1920, 384): 1205,
    (384, 2304): 1471, (2304, 384): 1401, (768, 1152): 1429, (1152, 768): 1415, (384, 2688): 1681,
    (2688, 384): 1597, (384, 3072): 1891, (3072, 384): 1793, (768, 1536): 1835, (1536, 768): 1807,
    (384, 3456): 2101, (3456, 384): 1989, (1152, 1152): 2017,
}


def test_token_count_per_candidate(proc):
    assert set(proc.candidate_resolutions) == set(TOKENS_PER_CANDIDATE)
    assert len(proc.candidate_resolutions) == 23
    for (width, height), expected in TOKENS_PER_CANDIDATE.items():
        assert select_best_resolution((width, height), proc.candidate_resolutions) == (width, height)
        assert proc.num_image_tokens_for(width // 384, height // 384) == expected, (width, height)


def test_constructor_adds_missing_pad_and_image_tokens():
    from transformers import PreTrainedTokenizerFast

    config = json.loads((checkpoint_dir("tiny_mha") / "processor_config.json").read_text())
    del config["processor_class"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint_dir("tiny_mha")))
    tokenizer.pad_token = None
    config["image_token"] = "<img_x>"
    processor = DeepseekVLV2Processor(tokenizer, **config)
    assert processor.pad_id == 2  # "<｜▁pad▁｜>" is already in the vocabulary
    assert processor.image_token_id == 2006  # appended at the end, before the chat-role tokens
    assert processor.encode("<img_x><|ref|><|User|><|Assistant|>", bos=False) == [2006, 2001, 2007, 2008]
    out = processor(prompt="a <img_x> b", images=[Image.new("RGB", (10, 10))], force_batchify=False)
    assert out.num_image_tokens == [421]
    assert out.input_ids.tolist().count(2006) == 421


def test_token_count_follows_patch_size():
    processor = fresh_processor(patch_size=16)  # 384 // 16 = 24 patches -> 12 x 12 after 2x2
    assert processor.num_image_tokens_for(1, 1) == 12 * 13 + 1 + 12 * 13
    assert processor.num_image_tokens_for(2, 1) == 12 * 13 + 1 + 12 * 25


def test_more_than_two_images_disable_tiling(proc):
    images = [Image.new("RGB", (640, 480), colour) for colour in [(200, 10, 10), (10, 200, 10), (10, 10, 200)]]
    out = proc(prompt="<image><image><image>", images=images, force_batchify=False)
    assert out.num_image_tokens == [421, 421, 421]
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert out.images.shape[0] == 6
    for i in range(3):
        assert torch.equal(out.images[2 * i], out.images[2 * i + 1])  # local tile == global view
    two = proc(prompt="<image><image>", images=images[:2], force_batchify=False)
    assert two.num_image_tokens == [1023, 1023]


def test_unused_images_are_refused(proc):
    # The reference ignores images beyond the <image> tags on the conversation path (and, P-PROC-3,
    # still counts them for the <= 2 tiling rule). Issue 9 makes that an error, as on the prompt
    # path, so the tiling rule now always counts the images that are used.
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
    out = proc(prompt="Hello world!", images=None, force_batchify=False)  # P-PROC-13 fixed
    assert out.input_ids.tolist() == [proc.bos_id] + proc.encode("Hello world!", bos=False)
    assert out.images.shape == (1, 3, 384, 384) and torch.count_nonzero(out.images) == 0
    assert out.images_spatial_crop.tolist() == [[0, 0]]
    assert out.num_image_tokens == []


def test_inference_mode_false_keeps_eos(proc):
    conversation = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello."}]
    out = proc(conversations=conversation, inference_mode=False, force_batchify=False)
    assert out.input_ids[-1].item() == proc.eos_id
    answer = proc.encode("Hello.", bos=False, eos=True)
    assert out.input_ids[-len(answer):].tolist() == answer  # no space before the answer (P-PROC-2)
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


def test_non_rgb_images_are_converted(proc):
    rgb = Image.new("RGB", (300, 200), (10, 120, 240))
    out_rgb = proc(prompt="<image>", images=[rgb], force_batchify=False)
    for image in [rgb.convert("RGBA"), rgb.convert("P"), Image.new("L", (300, 200), 90)]:
        out = proc(prompt="<image>", images=[image], force_batchify=False)
        assert out.images.shape == out_rgb.images.shape
        assert torch.equal(out.images, proc(prompt="<image>", images=[image.convert("RGB")],
                                            force_batchify=False).images)
    assert torch.equal(proc(prompt="<image>", images=[rgb.convert("RGBA")], force_batchify=False).images,
                       out_rgb.images)


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
