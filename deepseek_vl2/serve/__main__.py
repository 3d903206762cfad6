"""`python -m deepseek_vl2.serve --model_path ...`: load the model and serve the OpenAI-style API."""
import argparse
import functools
import logging
import os
import threading
import time
from pathlib import Path

from PIL import Image

from ..engine import ChatEngine, PrefillSettings, add_engine_arguments
from ..engine.prefill import parse_prefill_sms
from ..utils.extras import missing_extra
from .settings import ServerSettings

DEFAULTS = ServerSettings(model_id="")
API_KEY_ENV = "DEEPSEEK_VL2_API_KEY"
FATAL_EXIT_DELAY_S = 2.0  # after a fatal device error, /health reports it this long before the process exits
FATAL_EXIT_CODE = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepseek_vl2.serve", description=__doc__)
    p.add_argument("--model_path", required=True, help="hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    add_engine_arguments(p)
    p.add_argument("--allowed-local-media-path", type=Path,
                   help="allow file:// image URLs, for files below this directory only (default: none)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (default: refuse)")
    batching = p.add_argument_group("batching", "the continuous-batching engine (on CUDA: decode steps as CUDA "
                                     "graphs, captured at start-up), or static batching for a model spread "
                                     "over several GPUs")
    for flag, name, text in (("--max-batch-size", "max_batch_size", "rows of one static batch"),
                             ("--max-num-seqs", "max_num_seqs", "rows decoding at once in the continuous engine")):
        batching.add_argument(flag, type=int, default=getattr(DEFAULTS, name), help=text)
    for flag, name, text in (("--prefill-chunk", "chunk", "prompt tokens per forward of the continuous engine's "
                                                          "eager prefills (without CUDA graphs)"),
                             ("--vision-blocks", "vision_blocks", "vision-tower blocks (of 27) run per decode "
                                                                  "step for a prompt prefilled in pieces"),
                             ("--layer-tokens", "layer_tokens", "prompt tokens x decoder layers run per decode "
                                                                "step for a prompt prefilled in pieces")):
        batching.add_argument(flag, type=int, default=getattr(DEFAULTS.prefill, name), help=text)
    batching.add_argument("--prefill-device", help="another GPU (cuda:N) that prefills every prompt with its own "
                                                   "copy of the model, while the model's GPU only decodes "
                                                   "(continuous engine; default: prefill on the model's GPU, "
                                                   "see --prefill-sms)")
    batching.add_argument("--prefill-sms", type=prefill_sms, default=DEFAULTS.prefill.sms,
                          help="SMs of the model's GPU set aside to prefill prompts beside the decode steps while a "
                               "few rows decode (a CUDA green context; continuous engine). auto (default): half of "
                               "them (64 of an H200's 132) where the GPU can set SMs aside, else off; off: prefill "
                               "between the decode steps")
    batching.add_argument("--scheduler", choices=("auto", "static", "continuous"), default=DEFAULTS.scheduler,
                          help="auto: by the model's placement, as above (default); static or continuous: that one")
    batching.add_argument("--engine-process", action="store_true",
                          help="run the continuous engine in a process of its own, so that HTTP and request "
                               "preparation never hold the interpreter lock its decode steps wait for; this "
                               "process then loads only the processor")
    p.add_argument("--max-images", type=int, default=DEFAULTS.max_images, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULTS.max_image_pixels,
                   help="width x height of one image")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes,
                   help="request body size; also the size of one local or fetched image file")
    p.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout_s,
                   help="seconds from a request's arrival to its last token")
    p.add_argument("--max-text-chars", type=int, default=DEFAULTS.max_text_chars,
                   help="characters of text in one message and in all messages of a request")
    p.add_argument("--max-concurrent-requests", type=int, default=DEFAULTS.max_concurrent_requests,
                   help="chat requests in flight (read, queued or answering); beyond them: 429 with Retry-After")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, "
                        "else no key)")
    return p.parse_args(argv)


def prefill_sms(text: str):
    try:
        return parse_prefill_sms(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def engine_process(args, settings: ServerSettings):
    """The continuous engine in its own process (`--engine-process`): the model loads there, the
    processor here."""
    from ..processing import DeepseekVLV2Processor
    from .engine_process import EngineProcess, checkpoint_engine

    if settings.scheduler == "static":
        raise SystemExit("error: --engine-process serves with the continuous engine, not --scheduler static")
    build = functools.partial(checkpoint_engine, args.model_path, args.device, args.dtype, args.quantization,
                              settings.max_num_seqs, settings.prefill)
    try:
        return EngineProcess(build, DeepseekVLV2Processor.from_pretrained(args.model_path))
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None


def model_id(model_path: str) -> str:
    """The name clients use: the hub id, or a local directory's name."""
    return Path(model_path).resolve().name if os.path.isdir(model_path) else model_path


def main(argv=None) -> None:
    args = parse_args(argv)
    problem = missing_extra("serve")
    if problem is not None:  # before the model loads
        raise SystemExit(f"error: the server needs the serve extra: {problem}")
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            model_id=model_id(args.model_path), allowed_local_media_path=args.allowed_local_media_path,
            allow_remote_media=args.allow_remote_media, max_batch_size=args.max_batch_size,
            max_num_seqs=args.max_num_seqs, scheduler=args.scheduler, max_images=args.max_images,
            prefill=PrefillSettings(chunk=args.prefill_chunk, vision_blocks=args.vision_blocks,
                                    layer_tokens=args.layer_tokens, device=args.prefill_device,
                                    sms=args.prefill_sms),
            max_image_pixels=args.max_image_pixels,
            max_request_bytes=args.max_request_bytes, request_timeout_s=args.request_timeout,
            max_text_chars=args.max_text_chars, max_concurrent_requests=args.max_concurrent_requests,
            api_key=args.api_key)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own bomb check agrees with ours
    engine = engine_process(args, settings) if args.engine_process else ChatEngine.from_args(args.model_path, args)
    fatal = threading.Event()
    try:
        app = create_app(engine, settings, on_fatal=lambda reason: fatal.set())
    except ValueError as error:  # settings this model or machine cannot serve with (say, --prefill-sms on a CPU)
        raise SystemExit(f"error: {error}") from None
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5))

    def stop_after_fatal():
        fatal.wait()
        time.sleep(FATAL_EXIT_DELAY_S)  # long enough for a supervisor or client to read /health
        server.should_exit = True

    threading.Thread(target=stop_after_fatal, daemon=True, name="fatal-exit").start()
    server.run()
    if fatal.is_set():
        # the device is unusable: exit non-zero at once (a normal interpreter exit could wait on it)
        logging.getLogger(__name__).critical("exiting after an unrecoverable device error")
        logging.shutdown()
        os._exit(FATAL_EXIT_CODE)


if __name__ == "__main__":
    main()
