"""A request's preparation: its images decoded, its conversation built and checked, and the processor's
sample made (tiles, tokens), every problem a 400 that names the part of the request at fault.

Where it runs is the operator's choice (`--prepare-workers`):
  0 (`ThreadPreparation`)   on a thread of the server's pool, in the server's interpreter;
  N (`ProcessPreparation`)  in one of N worker processes (spawned at start-up, each with a copy of the
                            processor), whose sample comes back through the pool's pipe, its images
                            already cast to the model's dtype. Its tensors travel by value, not
                            through shared memory: a container's /dev/shm is often 64 MB, and a
                            worker writing beyond it dies of SIGBUS.
Decoding and tiling a 1024x1024 image takes tens of milliseconds of CPU. On a thread, part of that
time holds the interpreter lock that the engine's thread (one decode step every millisecond or two
for a small model) and the event loop (every streamed token) also need, and their waits for it show
as gaps between streamed tokens. In worker processes, the server's interpreter only reads requests,
streams tokens and decodes.

A worker that dies (killed, out of memory) fails its request with a 500; the pool is replaced (off
the event loop: starting a worker takes seconds) and later requests go on.
"""
import asyncio
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch
from fastapi.concurrency import run_in_threadpool

from ..engine import PromptTooLongError
from ..engine.chat_engine import prepare_sample
from .errors import APIError
from .media import decode_image
from .prompt import ControlTokens, build_conversation
from .schemas import Message

logger = logging.getLogger(__name__)

EncodedImages = List[Tuple[bytes, str]]  # each image's encoded bytes, and where it was in the request


@dataclass
class Prepared:
    sample: object  # the processor's sample (VLChatProcessorOutput) for the engine
    image_sizes: List[Tuple[int, int]]  # (width, height) of each image, for grounding boxes


def prepare_request(messages: List[Message], images: EncodedImages, prepare_one: Callable,
                    control_tokens: ControlTokens, max_image_pixels: int) -> Prepared:
    """Decode `images`, build the conversation of `messages`, make its sample with `prepare_one`
    (conversation, images): every problem is an APIError."""
    decoded = [decode_image(data, param, max_image_pixels) for data, param in images]
    conversation = build_conversation(messages, decoded, control_tokens)
    try:
        sample = prepare_one(conversation, decoded)
    except PromptTooLongError as error:
        raise APIError(400, str(error), param="messages", code="context_length_exceeded") from error
    except ValueError as error:
        raise APIError(400, str(error), param="messages", code="invalid_conversation") from error
    return Prepared(sample, [image.size for image in decoded])


class ThreadPreparation:
    """Preparation on the server's thread pool, with the engine's own `prepare_one`."""

    def __init__(self, prepare_one: Callable, control_tokens: ControlTokens, max_image_pixels: int):
        self.prepare_one = prepare_one
        self.control_tokens = control_tokens
        self.max_image_pixels = max_image_pixels

    async def prepare(self, messages: List[Message], images: EncodedImages) -> Prepared:
        return await run_in_threadpool(prepare_request, messages, images, self.prepare_one, self.control_tokens,
                                       self.max_image_pixels)

    def close(self) -> None:
        pass


@dataclass
class WorkerSettings:
    """What a worker process is started with (pickled once per worker)."""
    processor: object  # DeepseekVLV2Processor
    context_length: int  # prompt and answer together
    max_image_pixels: int
    dtype: torch.dtype  # the model's: sample images are cast to it in the worker


_worker: dict = {}  # in a worker process: its settings and control tokens


def _start_worker(settings: WorkerSettings) -> None:
    torch.set_num_threads(1)  # N workers side by side: one core each
    _worker.update(settings=settings, control_tokens=ControlTokens(settings.processor.tokenizer))


def _worker_ready(seconds: float) -> bool:
    time.sleep(seconds)  # keeps this worker busy, so that the pool starts the next one
    return bool(_worker)


def _start_all(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker of `pool` now (a pool starts one when a task finds no idle worker)."""
    ready = [pool.submit(_worker_ready, 0.2) for _ in range(workers)]
    if not all(future.result() for future in ready):
        raise RuntimeError("a request-preparation worker did not start")


def _prepare_in_worker(messages: List[Message], images: EncodedImages) -> Prepared:
    settings: WorkerSettings = _worker["settings"]

    def prepare_one(conversation, decoded):
        return prepare_sample(settings.processor, conversation, decoded, settings.context_length)

    prepared = prepare_request(messages, images, prepare_one, _worker["control_tokens"], settings.max_image_pixels)
    prepared.sample.images = prepared.sample.images.to(settings.dtype)  # half the bytes for bf16, cast here
    for name, value in vars(prepared.sample).items():
        if isinstance(value, torch.Tensor):
            setattr(prepared.sample, name, ByValue(value))
    return prepared


class ByValue:
    """A tensor that pickles as its bytes (torch's own reduction, in a pool of torch.multiprocessing,
    would move it to shared memory); `tensor()` in the receiving process."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype, self.shape = tensor.dtype, tuple(tensor.shape)
        self.data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # numpy has no bfloat16

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)


def _received(prepared: Prepared) -> Prepared:
    for name, value in vars(prepared.sample).items():
        if isinstance(value, ByValue):
            setattr(prepared.sample, name, value.tensor())
    return prepared


class ProcessPreparation:
    """Preparation in `workers` spawned processes (see the module's docstring); started here, each
    worker having loaded its processor before the first request."""

    def __init__(self, workers: int, settings: WorkerSettings):
        if workers < 1:
            raise ValueError(f"prepare workers must be >= 1, got {workers}")
        self.workers, self.settings = workers, settings
        started = time.perf_counter()
        self._replacing = threading.Lock()
        self.pool = self._new_pool()
        _start_all(self.pool, workers)
        logger.info("%d request-preparation worker process(es) started in %.1f s", workers,
                    time.perf_counter() - started)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(self.settings,))

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A new pool for `broken`, unless another request replaced it already; its workers are
        started here, on the caller's thread (the pool would start them on the event loop)."""
        with self._replacing:
            if self.pool is not broken:
                return
            logger.error("a request-preparation worker process died; starting a new pool")
            pool = self._new_pool()
            _start_all(pool, self.workers)
            self.pool = pool
            broken.shutdown(wait=False)

    async def prepare(self, messages: List[Message], images: EncodedImages) -> Prepared:
        # the images travel as bytes: their URLs (a data: URL holds the whole image again) stay here
        messages = [replace(m, images=[replace(ref, url="") for ref in m.images]) for m in messages]
        pool = self.pool
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(pool, _prepare_in_worker, messages, images)
        except BrokenProcessPool:
            await run_in_threadpool(self._replace, pool)
            raise APIError(500, "the request could not be prepared: its worker process ended unexpectedly",
                           code="internal_error") from None
        return _received(prepared)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def create_preparation(engine, workers: int, context_length: int, max_image_pixels: int,
                       control_tokens: Optional[ControlTokens] = None):
    """ThreadPreparation with `engine.prepare_one` for 0 workers, else ProcessPreparation with a copy
    of `engine.processor` in each worker, its images cast to the model's dtype."""
    control_tokens = control_tokens or ControlTokens(engine.tokenizer)
    if workers == 0:
        return ThreadPreparation(engine.prepare_one, control_tokens, max_image_pixels)
    model = getattr(engine.model, "language", engine.model)
    return ProcessPreparation(workers, WorkerSettings(engine.processor, context_length, max_image_pixels, model.dtype))
