"""Image files for tests of bad input."""
import struct
import zlib


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that claims `width` x `height` RGB pixels, with no pixel data: PIL refuses
    it (DecompressionBombError) before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
