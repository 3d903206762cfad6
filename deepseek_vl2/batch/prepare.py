"""The image workers: read a row's images and tile them into the engine's input, off the engine's thread.

Threads, not processes: PIL's decoding and resizing and torch's pixel normalisation release the GIL,
the processor is thread-safe (its tokenizer calls take a lock), and a prepared sample (image tiles,
several MB per row) stays in the engine's process instead of being pickled across one. How many rows
are prepared ahead is bounded by the runner (`EngineRunner`), not here.
"""
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ..engine import GenerationParams, ImageTagError, chat_conversation
from ..utils.io import load_pil_images
from .rows import Row


def default_workers() -> int:
    """Image workers of one engine: enough cores to decode and tile ahead of a fast GPU, at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


@dataclass
class Prepared:
    """A row ready for `ContinuousEngine.submit`, or the reason it cannot run (`error`)."""

    row: Row
    params: Optional[GenerationParams] = None
    sample: object = None
    error: Optional[str] = None


class Preparer:
    def __init__(self, engine, defaults: GenerationParams, workers: Optional[int] = None):
        """`engine`: a ContinuousEngine (its `prepare_one` tiles and tokenizes); `defaults`: the run's
        generation settings, under each row's own."""
        self.engine = engine
        self.defaults = defaults
        self.pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="batch-images")

    def submit(self, row: Row) -> "Future[Prepared]":
        return self.pool.submit(self.prepare, row)

    def prepare(self, row: Row) -> Prepared:
        """Never raises: a problem of the row becomes its error text."""
        try:
            params = row.params(self.defaults)
        except ValueError as error:
            return Prepared(row, error=f"bad generation setting: {error}".replace("GenerationParams.", ""))
        try:
            conversation = chat_conversation([{"role": "user", "content": row.prompt, "images": row.images}])
        except ImageTagError as error:
            return Prepared(row, error=f"prompt: {error.detail}")
        for index, path in enumerate(row.images):
            if not os.path.isfile(path):
                return Prepared(row, error=f"images[{index}]: no image file at {path!r}")
        try:
            images = load_pil_images(conversation)
            sample = self.engine.prepare_one(conversation, images)
        except ValueError as error:  # an unreadable image, a prompt too long for a slot
            return Prepared(row, error=str(error).replace(" (listed in message 0)", ""))
        except Exception as error:  # anything else is still this row's problem, not the run's
            return Prepared(row, error=f"{type(error).__name__}: {error}")
        return Prepared(row, params, sample)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
