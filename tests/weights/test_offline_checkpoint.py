"""deepseek_vl2.offline_checkpoint: a tiny random checkpoint in the official format that the
processor and the model load and run like a released one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.offline_checkpoint import main, make_offline_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "ckpt_tiny_mha"
FILES = {"config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "model.safetensors"}
GROUNDING = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
VARIANTS = {"tiny": (False, "greedy"), "small": (True, "greedy"), "base": (True, "noaux_tc")}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The tiny variant written by the command line, as users run it."""
    out = tmp_path_factory.mktemp("offline") / "tiny"
    result = subprocess.run([sys.executable, "-m", "deepseek_vl2.offline_checkpoint", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def checkpoint(cli_run, tmp_path_factory):
    """variant -> checkpoint directory, each made once."""
    made = {"tiny": cli_run[0]}

    def get(variant):
        if variant not in made:
            made[variant] = make_offline_checkpoint(tmp_path_factory.mktemp("offline") / variant, variant)
        return made[variant]

    return get


@pytest.fixture(scope="module")
def processor(cli_run):
    return DeepseekVLV2Processor.from_pretrained(str(cli_run[0]))


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_cli_writes_the_official_file_set(cli_run):
    out, stdout = cli_run
    assert {p.name for p in out.iterdir()} == FILES
    assert str(out.resolve()) in stdout and "tiny offline checkpoint" in stdout
    assert read_json(out / "processor_config.json") == read_json(FIXTURE / "processor_config.json")
    assert read_json(out / "special_tokens_map.json") == read_json(FIXTURE / "special_tokens_map.json")
    tokenizer_config = read_json(out / "tokenizer_config.json")
    assert tokenizer_config.keys() == read_json(FIXTURE / "tokenizer_config.json").keys()
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["add_eos_token"] is False
    assert tokenizer_config["clean_up_tokenization_spaces"] is False


def test_config_has_the_released_nesting(cli_run):
    config, fixture = read_json(cli_run[0] / "config.json"), read_json(FIXTURE / "config.json")
    for block in ("vision_config", "projector_config", "language_config"):
        assert config[block]["model_type"] == fixture[block]["model_type"]
        assert set(fixture[block]) - {"model_type"} <= set(config[block]), block
    assert config["candidate_resolutions"] == fixture["candidate_resolutions"]
    assert config["torch_dtype"] == config["language_config"]["torch_dtype"] == "bfloat16"
    assert config["projector_config"]["input_dim"] == config["vision_config"]["width"]
    assert config["projector_config"]["n_embed"] == config["language_config"]["hidden_size"]


def test_special_token_ids(cli_run, processor):
    tokenizer = processor.tokenizer
    assert (processor.bos_id, processor.eos_id, processor.pad_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                          "<｜▁pad▁｜>"]
    image_id = processor.image_token_id
    assert image_id == tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    expected = {token: image_id + 1 + i for i, token in enumerate(GROUNDING + ["<|User|>", "<|Assistant|>"])}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(tokenizer) == image_id + 8
    vocab_size = read_json(cli_run[0] / "config.json")["language_config"]["vocab_size"]
    assert vocab_size % 64 == 0 and vocab_size > len(tokenizer)


def test_tokenizer_round_trips_text_exactly(processor):
    for text in ["  Hello,\n\nworld  ", "A red circle\tin the top left corner.\n", "naïve ☃ 12345"]:
        ids = processor.encode(text, bos=False)
        assert processor.decode(ids) == text
    assert processor.encode("<image>", bos=False) == [processor.image_token_id]
    assert len(processor.encode(" the image shows a red circle", bos=False)) <= 8  # words learned, not bytes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_loads_strictly_and_generates(checkpoint, processor, variant, dtype):
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(checkpoint(variant)), dtype=dtype)
    language = model.config.language_config
    assert (language.use_mla, language.topk_method) == VARIANTS[variant]
    assert model.dtype == dtype
    conversation = [{"role": "<|User|>", "content": "<image>\nWhat is in the image?"},
                    {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=[Image.new("RGB", (500, 300), (20, 90, 200))])
    inputs = inputs.to("cpu", dtype=dtype)
    embeds = model.prepare_inputs_embeds(**inputs)
    assert embeds.shape == (1, inputs.input_ids.shape[1], language.hidden_size) and embeds.dtype == dtype
    tokens = model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask, max_new_tokens=5,
                            pad_token_id=processor.pad_id, bos_token_id=processor.bos_id,
                            eos_token_id=processor.eos_id, do_sample=False)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 5
    assert int(tokens.max()) < language.vocab_size
    assert isinstance(processor.decode(tokens[0].tolist(), skip_special_tokens=True), str)


def test_same_seed_gives_the_same_files(cli_run, tmp_path):
    again = make_offline_checkpoint(tmp_path / "again", "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (cli_run[0] / name).read_bytes(), name
    other = make_offline_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_refuses_a_non_empty_dir_without_force(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    with pytest.raises(SystemExit) as raised:
        main(["--out", str(out)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "not empty" in error and "--force" in error
    assert {p.name for p in out.iterdir()} == {"notes.txt", "model-00001-of-00002.safetensors"}

    main(["--out", str(out), "--force"])
    assert {p.name for p in out.iterdir()} == FILES | {"notes.txt"}
