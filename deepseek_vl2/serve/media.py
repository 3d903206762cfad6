"""Images of a request: `data:` URLs, `file://` paths the operator allowed, and (opt-in) http(s) URLs.

Local files: only below the operator's `--allowed-local-media-path`. The requested path is resolved to
its real path (symlinks followed, `..` collapsed) *before* anything is opened, and a real path outside
the allowed directory is refused with 403, so nothing outside is ever read. Only regular files are
read. (Someone who can write inside the allowed directory could still swap a component for a
symlink between the check and the read; the directory is the operator's, so that is out of scope.)

Every image is checked against `max_image_pixels` from its header, before its pixels are decoded
(decompression bombs), and a file or download larger than `max_bytes` is refused.
"""
import base64
import binascii
import io
import os
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image, ImageOps

from .errors import APIError

REMOTE_TIMEOUT_S = 10.0
REMOTE_MAX_REDIRECTS = 3


class MediaLoader:
    def __init__(self, allowed_local_dir: Optional[Path], allow_remote: bool, max_image_pixels: int, max_bytes: int):
        self.allowed_local_dir = allowed_local_dir
        self.allow_remote = allow_remote
        self.max_image_pixels = max_image_pixels
        self.max_bytes = max_bytes

    async def read(self, url: str, param: str) -> bytes:
        """The encoded image bytes behind `url` (not decoded yet)."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return decode_data_url(url, param)
        if scheme == "file":
            return self.read_local(url, param)
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote image URLs are disabled on this server (the operator can "
                                    "enable them with --allow-remote-media); send the image as a data: URL",
                               param=param, code="remote_media_disabled")
            return await self.fetch(url, param)
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r}; use a data: URL", param=param,
                       code="invalid_image_url")

    def read_local(self, url: str, param: str) -> bytes:
        parts = urlsplit(url)
        if self.allowed_local_dir is None:
            raise APIError(403, f"{param}: file:// images are not allowed on this server (the operator can allow a "
                                "directory with --allowed-local-media-path)", param=param, code="local_media_forbidden")
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{param}: a file:// URL must name a local absolute path, as file:///dir/image.png",
                           param=param, code="invalid_image_url")
        requested = unquote(parts.path)
        real = Path(os.path.realpath(requested))
        if not os.path.isabs(requested) or not real.is_relative_to(self.allowed_local_dir):
            raise APIError(403, f"{param}: {requested!r} is outside the directory this server may read images from",
                           param=param, code="local_media_forbidden")
        if not real.is_file():
            raise APIError(400, f"{param}: no image file at {requested!r}", param=param, code="image_not_found")
        if real.stat().st_size > self.max_bytes:
            raise APIError(400, f"{param}: the file is larger than {self.max_bytes} bytes", param=param,
                           code="image_too_large")
        return real.read_bytes()

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True,
                                         max_redirects=REMOTE_MAX_REDIRECTS) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise APIError(400, f"{param}: fetching the image failed with HTTP {response.status_code}",
                                       param=param, code="image_fetch_failed")
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > self.max_bytes:
                            raise APIError(400, f"{param}: the image is larger than {self.max_bytes} bytes",
                                           param=param, code="image_too_large")
                    return bytes(data)
        except httpx.HTTPError as error:
            raise APIError(400, f"{param}: fetching the image failed: {error}", param=param,
                           code="image_fetch_failed") from error

    def decode(self, data: bytes, param: str) -> Image.Image:
        """An upright RGB image; its size is checked from the header before the pixels are decoded."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.max_image_pixels:
                    raise APIError(400, f"{param}: the image is {width}x{height} = {width * height} pixels; this "
                                        f"server takes at most {self.max_image_pixels}", param=param,
                                   code="image_too_large")
                image = ImageOps.exif_transpose(image)
                return image.convert("RGB")
        except APIError:
            raise
        except Image.DecompressionBombError as error:
            raise APIError(400, f"{param}: {error}", param=param, code="image_too_large") from error
        except Exception as error:  # Pillow raises many kinds of errors on malformed files
            raise APIError(400, f"{param}: cannot read the image: {error}", param=param,
                           code="invalid_image") from error


def decode_data_url(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    media_type = header[len("data:"):].split(";")[0].strip().lower()
    if not comma or not header.endswith(";base64"):
        raise APIError(400, f"{param}: a data: URL must look like data:image/png;base64,<base64 data>", param=param,
                       code="invalid_image_url")
    if media_type and not media_type.startswith("image/"):
        raise APIError(400, f"{param}: the data: URL holds {media_type!r}, not an image", param=param,
                       code="invalid_image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(400, f"{param}: the data: URL is not valid base64 ({error})", param=param,
                       code="invalid_base64") from error
