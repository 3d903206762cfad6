"""inference.py's command line: what the arguments decide is refused with one `error:` line and exit
code 2, before the model loads (these runs name a checkpoint that does not exist, so an argument
checked after loading would fail on the checkpoint instead)."""
import re
from pathlib import Path

import pytest

import inference
from image_helpers import decompression_bomb_png

IMAGE = str(Path(__file__).resolve().parent / "fixtures" / "images" / "p04_50x50.png")
NO_CHECKPOINT = ["--model_path", "/nonexistent/checkpoint"]


@pytest.mark.parametrize("arguments, message", [
    (["--image", IMAGE, "--prompt", "<image><image> hi"], r"message 0: 2 <image> tags but 1 images"),
    (["--prompt", "<image> hi"], r"message 0: 1 <image> tags but 0 images"),
    (["--seed", str(10 ** 23)], r"seed must fit in 64 bits"),
    (["--max_new_tokens", "0"], r"max_new_tokens must be an int >= 1"),
    (["--output", "/nonexistent/dir/vg.jpg"], r"--output /nonexistent/dir/vg.jpg: the directory /nonexistent/dir "
                                              r"does not exist"),
    (["--output", "boxes.xyz"], r"--output boxes.xyz: .xyz is not an image format"),
    (["--device", "tpu"], r"device 'tpu' is not understood: use 'cpu', 'cuda' or 'cuda:N'"),
], ids=["too-few-images", "no-image-for-a-tag", "seed-beyond-64-bits", "max-new-tokens-0", "output-directory",
        "output-format", "device"])
def test_bad_arguments_are_one_error_line(arguments, message, capsys):
    prompt = [] if "--prompt" in arguments else ["--prompt", "hi"]
    assert inference.main(NO_CHECKPOINT + prompt + arguments) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith("\nerror: ")
    if "--device" not in arguments:
        assert "checkpoint" not in captured.err  # refused before loading
    assert re.search(message, captured.err), captured.err


def test_a_decompression_bomb_is_one_error_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb_png())
    assert inference.main(NO_CHECKPOINT + ["--image", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"cannot read image '.*bomb\.png' \(listed in message 0\): .*decompression bomb", err), err
