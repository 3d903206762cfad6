"""Tokenizer set-up and tokenization with images: special-token ids, encode/decode probes, exact-match
special tokens, tokens added to a tokenizer that lacks them, and text split at `<image>` tags."""
import functools
import json

import pytest
from PIL import Image

from deepseek_vl2.processing import DeepseekVLV2Processor
from goldens import CHECKPOINTS, SPEC

TOKENIZER_CASE = next(c for c in SPEC["cases"] if c["kind"] == "tokenizer")


@functools.cache
def cached_processor(checkpoint):
    return DeepseekVLV2Processor.from_pretrained(str(CHECKPOINTS[checkpoint]))


@pytest.fixture(scope="module")
def proc():
    return cached_processor("tiny_mha")


def checkpoint_dir(checkpoint):
    return CHECKPOINTS[checkpoint]


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



def test_text_pieces_are_tokenized_apart(proc):
    """The text on either side of a tag is encoded on its own, BPE never merges across it (as the
    official processor does)."""
    image = Image.new("RGB", (10, 10))
    ids, tiles, seq_mask, crops, counts = proc.tokenize_with_images("ab<image>cd", [image], bos=True, eos=True)
    assert counts == [421] and crops == [[1, 1]] and len(tiles) == 2
    expected = [proc.bos_id] + proc.encode("ab", bos=False) + [proc.image_token_id] * 421 \
        + proc.encode("cd", bos=False) + [proc.eos_id]
    assert ids == expected
    assert seq_mask == [id_ == proc.image_token_id for id_ in expected]


def test_tag_and_image_counts_must_match(proc):
    with pytest.raises(ValueError, match=r"the text has 2 <image> tags but 1 images were given"):
        proc.tokenize_with_images("<image><image>", [Image.new("RGB", (10, 10))])
