"""Warm-up at load time: the one-time costs of a process's first CUDA answer, paid while loading.

Before its first token, the first answer on a GPU in a fresh process would pay for work that no
later answer repeats: Triton hashing its own installation to key its kernel cache (about 0.35 s,
once per process), loading (or, with an empty cache, compiling) every Triton kernel the model
uses, cuBLAS / cuDNN / attention-kernel set-up and the lazy loading of each CUDA kernel on its
first launch, and the capture of the decode step's CUDA graph. `from_pretrained` pays these while
loading instead:

  * `start_background_work(device)` computes Triton's key and sets up the CUDA libraries on a
    thread while the weights are read (neither needs the weights);
  * `warm_up(model)` then runs short dummy generations through the real paths: a prompt with an
    image (vision tower, projector, prefill, greedy decoding on the device) and a text prompt
    whose length is a multiple of 16 (Triton specialises kernels on that) decoded by sampling
    (the host loop and the sampling ops). It takes a fraction of a second with warm caches.

Nothing a caller sees changes: the dummy runs use their own random generator (the global RNG is
untouched) and leave no state behind but the kernels, libraries and the batch-1 decoder that the
first real answer would have made. A model moved to the GPU after loading (`model.cuda()`) can be
warmed with `warm_up(model)`; without it, the first answer pays as before.
"""
import logging
import threading
from typing import Optional

import torch

from ..processing.image_tokens import ImageTokenInfo

logger = logging.getLogger(__name__)

DUMMY_NEW_TOKENS = 4


def start_background_work(device: torch.device) -> Optional[threading.Thread]:
    """Start the weight-free part of the warm-up on a thread; None when there is nothing to do."""
    if device.type != "cuda":
        return None
    thread = threading.Thread(target=_set_up_libraries, args=(device,), name="deepseek_vl2-warm-up", daemon=True)
    thread.start()
    return thread


def _set_up_libraries(device: torch.device) -> None:
    """Only saves time: whatever fails here (an old GPU, a Triton without this function) is left to
    the first real call, which reports it properly."""
    try:
        from triton.runtime.cache import triton_key

        triton_key()  # cached for the process: every kernel lookup needs it
    except Exception as error:  # noqa: BLE001  (Triton is optional; the kernels fall back without it)
        logger.debug("warm-up: Triton's cache key not computed ahead (%s)", error)
    try:
        with torch.cuda.device(device):
            x = torch.ones(64, 64, device=device, dtype=torch.float16)
            (x @ x).sum().item()  # cuBLAS
            image = torch.ones(1, 3, 28, 28, device=device, dtype=torch.float16)
            torch.nn.functional.conv2d(image, torch.ones(8, 3, 14, 14, device=device, dtype=torch.float16),
                                       stride=14).sum().item()  # cuDNN
    except Exception as error:  # noqa: BLE001
        logger.debug("warm-up: CUDA libraries not set up ahead (%s)", error)


def warm_up(model) -> None:
    """Run the model's first-answer paths once on dummy inputs (a no-op off CUDA). `model` is a
    DeepseekVLV2ForCausalLM or a DeepseekV2ForCausalLM."""
    if model.device.type != "cuda":
        return
    dummy_answers(model)
    torch.cuda.synchronize(model.device)


def dummy_answers(model) -> None:
    """The dummy generations of `warm_up` (on any device; the tests run them on the CPU)."""
    lm = getattr(model, "language", model)
    vocab = lm.get_input_embeddings().num_embeddings
    generator = torch.Generator(device=model.device).manual_seed(0)
    if hasattr(model, "vision"):
        ids, images, seq_mask, crop = _image_prompt(model, vocab)
        model.generate(input_ids=ids, images=images, images_seq_mask=seq_mask, images_spatial_crop=crop,
                       max_new_tokens=DUMMY_NEW_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=0)
    text = torch.arange(32, device=model.device)[None] % vocab
    model.generate(input_ids=text, max_new_tokens=DUMMY_NEW_TOKENS, do_sample=True, temperature=0.5, top_p=0.9,
                   repetition_penalty=1.1, eos_token_id=[], pad_token_id=0, generator=generator)


def _image_prompt(model, vocab: int):
    """One image of one local tile (plus its global view) in a short prompt, as the processor
    lays it out: some text, the image's positions, more text (an odd total length)."""
    vision, projector = model.config.vision_config, model.config.projector_config
    size = vision.image_size
    images = torch.zeros(1, 2, 3, size, size, device=model.device, dtype=model.dtype)
    crop = torch.tensor([[[1, 1]]], device=model.device)
    counts = ImageTokenInfo(((size, size),), vision.patch_size, projector.downsample_ratio)
    image_tokens = counts.tokens_for_grid(1, 1)
    before, after = 3, 14
    length = before + image_tokens + after
    length += 1 - length % 2
    ids = torch.arange(length, device=model.device)[None] % vocab
    seq_mask = torch.zeros(1, length, dtype=torch.bool, device=model.device)
    seq_mask[0, before:before + image_tokens] = True
    return ids, images, seq_mask, crop
