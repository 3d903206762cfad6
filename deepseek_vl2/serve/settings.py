"""The operator's limits and media policy for one server (set by the command-line flags)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..engine.prefill import PrefillSettings


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # the name /v1/models lists and requests must use
    allowed_local_media_path: Optional[Path] = None  # file:// images only below this directory; None: none
    allow_remote_media: bool = False  # fetch http(s) image URLs
    max_batch_size: int = 8  # rows of one static batch (a model spread over several GPUs)
    max_num_seqs: int = 8  # rows decoding at once in the continuous engine (KV slots)
    # how the continuous engine prefills: on one GPU, beside the decode steps on half its SMs where it can
    # set them aside, else between the steps
    prefill: PrefillSettings = field(default_factory=lambda: PrefillSettings(sms="auto"))
    scheduler: str = "auto"  # "auto": the continuous engine, static batching for a split model; or "static", "continuous"
    max_images: int = 4  # per request
    max_image_pixels: int = 36_000_000  # width * height, checked before an image is decoded
    max_request_bytes: int = 32 * 1024 * 1024  # request body; also one fetched or local image file
    request_timeout_s: float = 600.0  # from arrival to the last token
    max_text_chars: int = 1_000_000  # characters of text in one message, and in all of a request's messages
    max_concurrent_requests: int = 64  # chat requests in flight (read, queued or answering); more get 429
    api_key: Optional[str] = field(default=None, repr=False)  # a Bearer token every /v1 route requires; None: open

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
        if self.scheduler not in ("auto", "static", "continuous"):
            raise ValueError(f"scheduler must be auto, static or continuous, got {self.scheduler!r}")
        for name in ("max_batch_size", "max_num_seqs", "max_images",
                     "max_image_pixels", "max_request_bytes", "request_timeout_s", "max_text_chars",
                     "max_concurrent_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.allowed_local_media_path is not None:
            real = Path(self.allowed_local_media_path).resolve()
            if not real.is_dir():
                raise ValueError(f"allowed local media path {self.allowed_local_media_path} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", real)
