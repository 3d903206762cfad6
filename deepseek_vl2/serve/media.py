"""Images of a request: `data:` URLs, `file://` paths the operator allowed, and (opt-in) http(s) URLs.

Local files: only below the operator's `--allowed-local-media-path`. The requested path is resolved to
its real path (symlinks followed, `..` collapsed) *before* anything is opened, and a real path outside
the allowed directory is refused with 403, so nothing outside is ever read. Only regular files are
read. (Someone who can write inside the allowed directory could still swap a component for a
symlink between the check and the read; the directory is the operator's, so that is out of scope.)

Remote images (only with `--allow-remote-media`): the host is resolved here and every address it
resolves to must be public (`public_address`: no private, loopback, link-local, multicast, reserved
or unspecified address, IPv4 or IPv6, IPv4-mapped included); the connection goes to the address
that was checked (Host header and TLS server name stay the URL's), so a second DNS answer cannot
redirect it. Redirects are followed here, at most REMOTE_MAX_REDIRECTS, each target checked the same
way. The whole download has a deadline (REMOTE_DEADLINE_S) and a size cap (`max_bytes`). Proxy
settings from the environment are ignored.

Every image is checked against `max_image_pixels` from its header, before its pixels are decoded
(decompression bombs), and a file or download larger than `max_bytes` is refused.
"""
import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import APIError

REMOTE_TIMEOUT_S = 10.0  # connect, and each read
REMOTE_DEADLINE_S = 20.0  # the whole download, redirects included
REMOTE_MAX_REDIRECTS = 3
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


class MediaLoader:
    def __init__(self, allowed_local_dir: Optional[Path], allow_remote: bool, max_image_pixels: int, max_bytes: int,
                 transport: Optional[httpx.AsyncBaseTransport] = None):
        self.allowed_local_dir = allowed_local_dir
        self.transport = transport  # tests replace the network
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
        if "\x00" in requested:
            raise APIError(400, f"{param}: the file:// URL contains a NUL byte", param=param,
                           code="invalid_image_url")
        try:
            return self._read_below_allowed(requested, param)
        except OSError as error:  # unreadable, a name too long, ...: the request's problem, named
            raise APIError(400, f"{param}: cannot read {requested!r}: {error.strerror or error}", param=param,
                           code="image_not_found") from None

    def _read_below_allowed(self, requested: str, param: str) -> bytes:
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
        """The body of `url`, within REMOTE_DEADLINE_S and `max_bytes` for the whole download, from
        public addresses only (`public_address`), redirects followed here, each one checked again."""
        try:
            async with asyncio.timeout(REMOTE_DEADLINE_S):
                async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=False, trust_env=False,
                                             transport=self.transport) as client:
                    for _ in range(REMOTE_MAX_REDIRECTS + 1):
                        target, host, server_name = await checked_target(url, param)
                        async with client.stream("GET", target, headers={"Host": host},
                                                 extensions={"sni_hostname": server_name}) as response:
                            if response.is_redirect:
                                url = urljoin(url, response.headers["location"])
                                continue
                            return await self._body(response, param)
        except TimeoutError:
            raise APIError(400, f"{param}: fetching the image took longer than {REMOTE_DEADLINE_S:g} s",
                           param=param, code="image_fetch_failed") from None
        except httpx.HTTPError as error:
            raise APIError(400, f"{param}: fetching the image failed: {error}", param=param,
                           code="image_fetch_failed") from error
        raise APIError(400, f"{param}: more than {REMOTE_MAX_REDIRECTS} redirects", param=param,
                       code="image_fetch_failed")

    async def _body(self, response: httpx.Response, param: str) -> bytes:
        too_large = APIError(400, f"{param}: the image is larger than {self.max_bytes} bytes", param=param,
                             code="image_too_large")
        if response.status_code != 200:
            raise APIError(400, f"{param}: fetching the image failed with HTTP {response.status_code}",
                           param=param, code="image_fetch_failed")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        data = bytearray()
        async for chunk in response.aiter_bytes():  # decompressed: the cap bounds what is kept
            data += chunk
            if len(data) > self.max_bytes:
                raise too_large
        return bytes(data)

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
        except Image.DecompressionBombError as error:  # Pillow's message names twice the limit: say ours
            raise APIError(400, f"{param}: the image has more pixels than this server's limit of "
                                f"{self.max_image_pixels}", param=param, code="image_too_large") from error
        except UnidentifiedImageError as error:  # its message holds the repr of our buffer object
            raise APIError(400, f"{param}: cannot read the image: not in an image format this server reads",
                           param=param, code="invalid_image") from error
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


def public_address(address: str) -> bool:
    """Whether `address` (IPv4 or IPv6) is a public unicast address: not private, loopback, link-local,
    multicast, reserved, unspecified or otherwise special-purpose; IPv6 forms that carry an IPv4
    address (IPv4-mapped, 6to4, Teredo, NAT64) are judged by that IPv4 address too."""
    ip = ipaddress.ip_address(address.split("%")[0])  # a zone index (fe80::1%eth0) is link-local anyway
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return public_address(str(ip.ipv4_mapped))
    if ip.version == 6:
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in NAT64_PREFIX:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(v4 is not None and not public_address(str(v4)) for v4 in embedded):
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def resolve_host(host: str, port: int) -> list:
    """The addresses `host` resolves to (a literal address resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def checked_target(url: str, param: str) -> tuple:
    """(`url` with its host replaced by a checked address, the Host header, the TLS server name):
    every address the host
    resolves to must be public, and the request goes to the address that was checked, so a second
    DNS answer cannot point it elsewhere."""
    refused = APIError(400, f"{param}: the image URL's host is not a public internet address", param=param,
                       code="remote_media_forbidden")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise APIError(400, f"{param}: invalid image URL: {error}", param=param, code="invalid_image_url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise APIError(400, f"{param}: only http(s) image URLs with a host can be fetched", param=param,
                       code="invalid_image_url")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = await resolve_host(parsed.host, port)
    except (OSError, UnicodeError) as error:
        raise APIError(400, f"{param}: cannot resolve the image URL's host: {error}", param=param,
                       code="image_fetch_failed") from None
    if not addresses or not all(public_address(address) for address in addresses):
        raise refused
    server_name = parsed.raw_host.decode("ascii")  # IDNA-encoded
    host_header = f"[{server_name}]" if ":" in server_name else server_name  # a literal IPv6 address
    if parsed.port is not None:
        host_header += f":{parsed.port}"
    return parsed.copy_with(host=addresses[0].split("%")[0]), host_header, server_name
