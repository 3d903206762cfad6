"""Write a tiny random-weight DeepSeek-VL2 checkpoint in the official on-disk format, so the full
pipeline (processor, model loading, generation, `inference.py`) runs without the real weights.

    python -m deepseek_vl2.offline_checkpoint --out DIR [--variant tiny|small|base] [--seed N]

The directory gets what a released checkpoint holds: config.json (nested vision / projector /
language blocks at toy sizes), bf16 model.safetensors with the official tensor names,
processor_config.json, and a byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) trained here on an offline corpus: standard-library docstrings plus
sentences about images, so a random model's output decodes to word-like text.

Variants follow the three releases' language models: tiny = plain multi-head attention and
greedy softmax routing; small = MLA with greedy routing; base = MLA with noaux_tc sigmoid routing.
"""
import argparse
import importlib.util
import inspect
import itertools
import json
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .models.checkpoint import INDEX_NAME
from .models.configuration_deepseek_vl_v2 import DeepseekVLV2Config
from .models.modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM
from .models.processing_deepseek_vl_v2 import DeepseekVLV2Processor
from .models.random_init import init_random_weights

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
EXTRA_SPECIAL_TOKENS = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
CHAT_TOKENS_ADDED_BY_PROCESSOR = 2  # <|User|>, <|Assistant|>

IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO = 384, 14, 2
# (width, height) tile grids of every release: all nw x nh with nw * nh <= 9, times 384.
CANDIDATE_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152],
]

CORPUS_MODULES = ["argparse", "collections", "json", "pathlib", "string", "textwrap", "logging", "functools",
                  "itertools", "random", "datetime", "shutil", "os", "re", "inspect"]
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "brown", "pink"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "cube", "ball", "box", "cat", "dog", "tree"]
PLACES = ["in the top left corner", "in the top right corner", "in the bottom left corner",
          "in the bottom right corner", "in the centre", "on the left", "on the right", "at the top",
          "at the bottom", "next to the window", "on the table", "under the tree"]
SENTENCES = [
    "The image shows {a} {colour} {shape} {place}.",
    "There is {a} {colour} {shape} {place} of the picture.",
    "In this photo, {a} large {colour} {shape} is {place}, and the background is plain.",
    "I can see {a} small {colour} {shape} {place}.",
]

LANGUAGE_VARIANTS = {  # scoring_func defaults to softmax, as in the tiny and small releases
    "tiny": dict(use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                 v_head_dim=0, topk_method="greedy", norm_topk_prob=False,
                 routed_scaling_factor=1.0, n_routed_experts=8, num_experts_per_tok=2),
    "small": dict(use_mla=True, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, topk_method="greedy", norm_topk_prob=False,
                  routed_scaling_factor=1.0, n_routed_experts=12, num_experts_per_tok=4),
    "base": dict(use_mla=True, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                 routed_scaling_factor=2.0, n_routed_experts=16, num_experts_per_tok=6),
}


# ---- tokenizer --------------------------------------------------------------------------------

def training_corpus() -> list:
    """Standard-library docstrings plus sentences describing images (colours, shapes, positions)."""
    texts = []
    for name in CORPUS_MODULES:
        module = _fresh_module(name)
        texts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            if inspect.isfunction(member) or inspect.isclass(member):
                texts.append(inspect.getdoc(member) or "")
    for template, colour, shape, place in itertools.product(SENTENCES, COLOURS, SHAPES, PLACES):
        article = "an" if colour[0] in "aeiou" else "a"
        texts.append(template.format(a=article, colour=colour, shape=shape, place=place))
    return [text for text in texts if text]


def _fresh_module(name: str):
    """A new copy of a standard-library module, not the one in sys.modules: other libraries patch
    those (Ray replaces `inspect.isgenerator` and logging's record factory), which would change the
    corpus, and so the tokenizer, with what the process imported before."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tokenizer(vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE: bos/eos/pad at ids 0-2, the learned vocabulary, then `<image>` and the
    grounding tokens (the processor appends `<|User|>` and `<|Assistant|>` when it loads)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_corpus(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in EXTRA_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """tokenizer.json from `save_pretrained`; tokenizer_config.json and special_tokens_map.json
    written as the releases have them (transformers 5.x writes neither in that form)."""
    tokenizer.save_pretrained(str(out))
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": PAD,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- config -----------------------------------------------------------------------------------

def config_dict(variant: str, vocab_size: int) -> dict:
    """config.json of a real DeepSeek-VL2 structure at toy size, nested and keyed as released."""
    width = hidden = 64
    return {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE, "width": width, "layers": 2, "heads": 4, "mlp_ratio": 3.7362,
            "global_pool": "map", "ignore_head": True, "class_token": False, "num_classes": 0, "weight_init": "skip",
        },
        "projector_config": {
            "model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu", "input_dim": width,
            "n_embed": hidden, "depth": 2, "mlp_ratio": 1, "downsample_ratio": DOWNSAMPLE_RATIO,
        },
        "language_config": {
            "model_type": "deepseek_v2", "hidden_size": hidden, "intermediate_size": 160,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0,
            "eos_token_id": 1, "torch_dtype": "bfloat16", **LANGUAGE_VARIANTS[variant], "n_group": 1,
            "topk_group": 1, "vocab_size": vocab_size, "n_shared_experts": 2,
        },
    }


def processor_config() -> dict:
    return {
        "add_special_token": False,
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": False,
        "normalize": True,
        "pad_token": PAD,
        "patch_size": PATCH_SIZE,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }


# ---- the checkpoint ---------------------------------------------------------------------------

def make_offline_checkpoint(out_dir, variant: str = "tiny", seed: int = 0, vocab_size: int = 3000,
                            force: bool = False) -> Path:
    """Write the checkpoint into `out_dir` and return its path. A non-empty `out_dir` is refused
    unless `force`, which replaces the checkpoint files there (other files are left alone)."""
    if variant not in LANGUAGE_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(LANGUAGE_VARIANTS)}, not {variant!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to overwrite the checkpoint there")
        for stale in [*out.glob("*.safetensors"), out / INDEX_NAME]:  # a sharded checkpoint left there
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab_size)
    rows = len(tokenizer) + CHAT_TOKENS_ADDED_BY_PROCESSOR
    config = config_dict(variant, vocab_size=(rows // 64 + 1) * 64)  # more rows than tokens, as released
    model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_dict(config))
    init_random_weights(model, seed=seed)
    model.to(torch.bfloat16).save_pretrained(out)
    _write_json(out / "config.json", config)  # in the released key style, not transformers 5.x's
    _write_json(out / "processor_config.json", processor_config())
    save_tokenizer(tokenizer, out)
    return out


@torch.inference_mode()
def verify_checkpoint(out_dir) -> str:
    """Load `out_dir` as users do, run one forward on a prompt with an image; a one-line summary."""
    processor = DeepseekVLV2Processor.from_pretrained(str(out_dir))
    model = DeepseekVLV2ForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    conversation = [{"role": "<|User|>", "content": "<image>\nDescribe the image."},
                    {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=[Image.new("RGB", (64, 48), (200, 30, 30))])
    inputs = inputs.to("cpu", dtype=torch.float32)
    embeds = model.prepare_inputs_embeds(**inputs)
    logits = model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the checkpoint in {out_dir} produced non-finite logits")
    language = model.config.language_config
    n_params = sum(p.numel() for p in model.parameters())
    return (f"{n_params:,} parameters, use_mla={language.use_mla}, topk_method={language.topk_method}, "
            f"tokenizer {len(processor.tokenizer)} tokens, vocab_size {language.vocab_size}, "
            f"prompt {inputs.input_ids.shape[1]} tokens -> logits {tuple(logits.shape)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--variant", choices=sorted(LANGUAGE_VARIANTS), default="tiny",
                        help="language model structure: tiny (MHA, greedy), small (MLA, greedy), "
                             "base (MLA, noaux_tc sigmoid)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--vocab-size", type=int, default=3000, help="BPE vocabulary size to train")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint in a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = make_offline_checkpoint(args.out, args.variant, args.seed, args.vocab_size, args.force)
    except FileExistsError as err:
        parser.error(str(err))
    print(out.resolve())
    print(f"{args.variant} offline checkpoint: {verify_checkpoint(out)}")


if __name__ == "__main__":
    main()
