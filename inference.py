"""Ask DeepSeek-VL2 about images from the command line.

    python inference.py --model_path deepseek-ai/deepseek-vl2-tiny
    python inference.py --model_path deepseek-ai/deepseek-vl2-small --chunk_size 512 \
        --image photo.jpg --prompt "<|ref|>The cat<|/ref|>"

Without --image/--prompt it runs the reference's demo: in-context visual grounding on the two
images in images/. The answer streams as it is generated; a timing line follows; when the
answer holds boxes, they are drawn on the last image and saved (vg.jpg).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEMO_IMAGES = [HERE / "images" / "incontext_visual_grounding_1.jpeg", HERE / "images" / "icl_vg_2.jpeg"]
DEMO_PROMPT = ("<image>\n<image>\n<|grounding|>In the first image, an object within the red rectangle is marked. "
               "Locate the object of the same category in the second image.")


def parse_args(argv=None):
    from deepseek_vl2.engine import add_engine_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or directory")
    add_engine_arguments(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", help="the question; <image> tags missing for the images are added in front")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.4, help="0 for greedy decoding")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--no_stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--output", default="vg.jpg", help="where to save the image with grounding boxes")
    return p.parse_args(argv)


def build_conversation(prompt, image_paths):
    """The engine's conversation for one question about `image_paths` (tags placed by the engine's rule)."""
    from deepseek_vl2.engine import chat_conversation

    if prompt is None:
        prompt = "Describe this image." if image_paths else "Hello! What can you do?"
    return chat_conversation([{"role": "user", "content": prompt, "images": [str(p) for p in image_paths]}])


def check_output_path(path: str) -> None:
    """--output must be an image file PIL can write, in a directory that exists (checked before the
    model loads, not after the answer)."""
    from PIL import Image

    target = Path(path)
    if target.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output {path}: {target.suffix or 'no extension'} is not an image format "
                         "(use .jpg or .png)")
    if not target.resolve().parent.is_dir():
        raise ValueError(f"--output {path}: the directory {target.resolve().parent} does not exist")


def main(argv=None) -> int:
    args = parse_args(argv)
    from deepseek_vl2.engine import ChatEngine, GenerationParams
    from deepseek_vl2.grounding import draw_boxes
    from deepseek_vl2.models.checkpoint import CheckpointError
    from deepseek_vl2.utils.io import load_pil_images

    demo = not args.image and args.prompt is None
    try:  # everything the arguments decide is checked before the model loads
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
        check_output_path(args.output)
        conversation = build_conversation(DEMO_PROMPT if demo else args.prompt, DEMO_IMAGES if demo else args.image)
        images = load_pil_images(conversation)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        started = time.perf_counter()
        engine = ChatEngine.from_args(args.model_path, args)
        load_s = time.perf_counter() - started
        print(f"{len(images)} image(s); model on {engine.model.device} in {str(engine.model.dtype)[6:]}", flush=True)
        prompt = engine.processor.format_messages(conversation, sft_format=engine.processor.sft_format)
        print(prompt, end=" ", flush=True)
        on_text = None if args.no_stream else (lambda piece: print(piece, end="", flush=True))
        result = engine.chat(conversation, images, params, on_text=on_text)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    if args.no_stream:
        print(result.text, end="")
    t = result.timings
    print(f"\n[load {load_s:.1f} s | prompt {result.prompt_tokens} tokens, prefill {t.prefill_ms:.0f} ms | "
          f"{len(result.token_ids)} new tokens, {t.tokens_per_s:.1f} tokens/s | {result.finish_reason}]")
    if result.boxes and images:
        draw_boxes(images[-1], result.boxes).save(args.output, quality=85)
        print(f"grounding boxes drawn on the last image: {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
