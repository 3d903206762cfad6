"""`python -m deepseek_vl2.serve --model_path ...`: load the model and serve the OpenAI-style API."""
import argparse
import logging
import os
from pathlib import Path

import uvicorn
from PIL import Image

from ..engine import ChatEngine, add_engine_arguments
from .app import create_app
from .settings import ServerSettings

DEFAULTS = ServerSettings(model_id="")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepseek_vl2.serve", description=__doc__)
    p.add_argument("--model_path", required=True, help="hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    add_engine_arguments(p)
    p.add_argument("--allowed-local-media-path", type=Path,
                   help="allow file:// image URLs, for files below this directory only (default: none)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (default: refuse)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS.max_batch_size)
    p.add_argument("--max-images", type=int, default=DEFAULTS.max_images, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULTS.max_image_pixels,
                   help="width x height of one image")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes,
                   help="request body size; also the size of one local or fetched image file")
    p.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout_s,
                   help="seconds from a request's arrival to its last token")
    return p.parse_args(argv)


def model_id(model_path: str) -> str:
    """The name clients use: the hub id, or a local directory's name."""
    return Path(model_path).resolve().name if os.path.isdir(model_path) else model_path


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            model_id=model_id(args.model_path), allowed_local_media_path=args.allowed_local_media_path,
            allow_remote_media=args.allow_remote_media, max_batch_size=args.max_batch_size,
            max_images=args.max_images, max_image_pixels=args.max_image_pixels,
            max_request_bytes=args.max_request_bytes, request_timeout_s=args.request_timeout)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own bomb check agrees with ours
    engine = ChatEngine.from_args(args.model_path, args)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
