"""Bad image files in real formats, shared by the tests of training's image checks and of predict's."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_header(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header promises width x height RGB pixels: a decompression bomb's disguise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def noise_jpeg(size: int = 64) -> bytes:
    """A real JPEG big enough that half of it ends inside the compressed pixels, not the header."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def truncated_jpeg() -> bytes:
    """The first half of ``noise_jpeg()``: it ends inside the compressed pixels."""
    jpeg = noise_jpeg()
    return jpeg[: len(jpeg) // 2]
