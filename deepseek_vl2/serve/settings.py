"""The operator's limits and media policy for one server (set by the command-line flags)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # the name /v1/models lists and requests must use
    allowed_local_media_path: Optional[Path] = None  # file:// images only below this directory; None: none
    allow_remote_media: bool = False  # fetch http(s) image URLs
    max_batch_size: int = 8
    max_images: int = 4  # per request
    max_image_pixels: int = 36_000_000  # width * height, checked before an image is decoded
    max_request_bytes: int = 32 * 1024 * 1024  # request body; also one fetched or local image file
    request_timeout_s: float = 600.0  # from arrival to the last token

    def __post_init__(self):
        for name in ("max_batch_size", "max_images", "max_image_pixels", "max_request_bytes", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.allowed_local_media_path is not None:
            real = Path(self.allowed_local_media_path).resolve()
            if not real.is_dir():
                raise ValueError(f"allowed local media path {self.allowed_local_media_path} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", real)
