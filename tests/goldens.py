"""Access to the golden fixtures recorded from the official implementation (tests/fixtures)."""
import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = json.loads((FIXTURES / "cases.json").read_text())
TOL = SPEC["tolerances"]
MAX_NEW = SPEC["max_new_tokens"]
CASES = {case["name"]: case for case in SPEC["cases"]}
SINGLE_CASES = [name for name, case in CASES.items() if case["kind"] == "single"]
CHECKPOINTS = {name: FIXTURES / ck["dir"] for name, ck in SPEC["checkpoints"].items()}


def checkpoint_dir(case_name: str) -> Path:
    return CHECKPOINTS[CASES[case_name]["checkpoint"]]


def expected_ids(checkpoint: str) -> dict:
    return SPEC["checkpoints"][checkpoint]["expected_ids"]


@functools.cache
def tensors(case_name: str) -> dict:
    return load_file(str(FIXTURES / CASES[case_name]["expected_file"]))


def golden_tiles(case_name: str, sample: int = None) -> torch.Tensor:
    """The float32 tiles the official processor produced ([tiles, 3, 384, 384])."""
    case = CASES[case_name]
    expected = case["expected"] if sample is None else case["expected"]["samples"][sample]
    with np.load(FIXTURES / case["pixels_file"]) as stored:
        if sample is None and "images_f32" in stored.files:
            return torch.from_numpy(np.array(stored["images_f32"], dtype=np.float32))
        u8 = stored["tiles_u8" if sample is None else f"s{sample}_tiles_u8"]
        tiles = (torch.from_numpy(np.array(u8)).float().div(255) - 0.5) / 0.5
    for i in expected["zero_tiles"]:
        tiles[i] = 0
    return tiles


def rel_err(candidate, gold) -> float:
    candidate, gold = torch.as_tensor(candidate).double(), torch.as_tensor(gold).double()
    assert candidate.shape == gold.shape, f"shape {tuple(candidate.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(candidate).all()
    return ((candidate - gold).abs().max() / gold.abs().max().clamp_min(1e-30)).item()


def margin_threshold(scale: float) -> float:
    return TOL["margin_factor"] * TOL["logits_rel"] * scale


def assert_tokens_match(candidate, gold, margins, scale):
    """Greedy tokens equal, except after a step whose golden top-1 margin is within noise."""
    candidate, gold = [int(t) for t in candidate], [int(t) for t in gold]
    for i, token in enumerate(gold):
        assert i < len(candidate), f"only {len(candidate)} tokens, expected {len(gold)}"
        if candidate[i] != token:
            assert margins[i] <= margin_threshold(scale), (
                f"token {i}: {candidate[i]} != {token} (golden margin {margins[i]:.3f}); {candidate} vs {gold}")
            return i
    return len(gold)


@functools.cache
def fixture_model(checkpoint: str, dtype: torch.dtype = torch.float32):
    """A fixture checkpoint loaded through the public Auto API (cached; eval mode)."""
    from transformers import AutoModelForCausalLM

    import deepseek_vl2  # noqa: F401  (registers the Auto classes)

    return AutoModelForCausalLM.from_pretrained(str(CHECKPOINTS[checkpoint]), trust_remote_code=True, dtype=dtype)


def golden_inputs(case_name: str) -> dict:
    """The official processor's tensors for a single case, as model keyword arguments."""
    t = tensors(case_name)
    return dict(input_ids=t["input_ids"], images=golden_tiles(case_name)[None],
                images_seq_mask=t["images_seq_mask"].bool(), images_spatial_crop=t["images_spatial_crop"])
