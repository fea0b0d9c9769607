"""Small real PNGs (encoder, size reader, solid or noisy images) and the image values nodes pass."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ._constants import SAVED_IMAGE_MAX_SIDE_PX

# --- PNG ----------------------------------------------------------------------------------------------

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESS_LEVEL: Final = 4  # ComfyUI's SaveImage default
_PNG_RGB_8BIT: Final = (8, 2, 0, 0, 0)  # bit depth, colour type (truecolour), compression, filter, interlace


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(width: int, height: int, rgb: bytes, *, text: Mapping[str, str] | None = None) -> bytes:
    """Encode 8-bit RGB pixels (rows top to bottom) as a PNG, with optional ``tEXt`` chunks."""
    if width < 1 or height < 1:
        raise ValueError(f"PNG size must be positive, not {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{width}x{height} RGB needs {stride * height} bytes, got {len(rgb)}")
    scanlines = b"".join(b"\x00" + rgb[row * stride : (row + 1) * stride] for row in range(height))
    chunks = [_png_chunk(b"IHDR", struct.pack(">II5B", width, height, *_PNG_RGB_8BIT))]
    for key, value in (text or {}).items():
        chunks.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(scanlines, PNG_COMPRESS_LEVEL)))
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _clamp_byte(value: int) -> int:
    return 0 if value < 0 else 255 if value > 255 else value


def _split_rgb(color: int) -> tuple[int, int, int]:
    return (color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    longest = max(width, height, 1)
    if longest <= max_side:
        return max(1, width), max(1, height)
    return max(1, width * max_side // longest), max(1, height * max_side // longest)


def render_rgb(width: int, height: int, color: int, *, noise_seed: int | None = None, noise: float = 0.0) -> bytes:
    """Solid ``color`` (0xRRGGBB), plus seeded grey noise of amplitude ``noise`` (0..1) if a seed is given."""
    red, green, blue = _split_rgb(color)
    if noise_seed is None or noise <= 0:
        return bytes((red, green, blue)) * (width * height)
    rng = random.Random(noise_seed)
    amplitude = round(255 * min(noise, 1.0))
    pixels = bytearray()
    for _ in range(width * height):
        delta = rng.randint(-amplitude, amplitude)
        pixels += bytes((_clamp_byte(red + delta), _clamp_byte(green + delta), _clamp_byte(blue + delta)))
    return bytes(pixels)


# --- values flowing between simulated nodes -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimImage:
    """An IMAGE batch: ``batch`` images of ``width`` x ``height`` in one colour, maybe with noise."""

    width: int
    height: int
    batch: int
    color: int  # 0xRRGGBB
    noise_seed: int | None = None
    noise: float = 0.0

    def png(
        self, index: int, *, max_side: int = SAVED_IMAGE_MAX_SIDE_PX, text: Mapping[str, str] | None = None
    ) -> bytes:
        width, height = _fit(self.width, self.height, max_side)
        seed = None if self.noise_seed is None else self.noise_seed + index
        return encode_png(
            width, height, render_rgb(width, height, self.color, noise_seed=seed, noise=self.noise), text=text
        )

    def __str__(self) -> str:  # what PreviewAny shows (ComfyUI prints the tensor)
        return f"tensor(shape=[{self.batch}, {self.height}, {self.width}, 3], color=#{self.color:06x})"


@dataclass(frozen=True, slots=True)
class SimMask:
    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"tensor(shape=[{self.batch}, {self.height}, {self.width}])"


@dataclass(frozen=True, slots=True)
class SimLatent:
    width: int  # in pixels of the decoded image
    height: int
    batch: int
    seed: int | None = None
