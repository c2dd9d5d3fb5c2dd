"""The release depth encoding: 16-bit grayscale PNG, ``depth = v / 65536 * scale + offset``.

The G3DR release stores pseudo-depth as ``NAME_depth.png`` (uint16); the reference training code decodes
``v / 65536 * 2 + 4`` so depth lies in [4, 6] scene units (camera at radius 5, scene box [-1, 1]^3).
WebDataset's stock image decoders turn PNGs into 8-bit images, so this module decodes the PNG bytes
itself and guarantees an exact uint16 round trip (uint16 in, the same uint16 out).

This module only converts between bytes, uint16 codes and float depth; it does not resize.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from g3dr.errors import DataError

DEPTH_SCALE = 2.0
DEPTH_OFFSET = 4.0
U16_MAX = 65535

# PIL modes of a single-channel 16-bit image, as opened from a PNG.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def depth_from_u16(codes: np.ndarray, scale: float = DEPTH_SCALE, offset: float = DEPTH_OFFSET) -> np.ndarray:
    """uint16 codes (any shape) -> float32 depth ``codes / 65536 * scale + offset``."""
    return (codes.astype(np.float64) / 65536.0 * scale + offset).astype(np.float32)


def u16_from_depth(depth: np.ndarray, scale: float = DEPTH_SCALE, offset: float = DEPTH_OFFSET) -> np.ndarray:
    """Float depth (any shape) -> the nearest uint16 code, clipped to [0, 65535].

    Depth outside [offset, offset + scale * 65535 / 65536] is clipped; NaN is an error.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if np.isnan(depth).any():
        raise DataError("depth contains NaN; fix the depth source before encoding")
    codes = np.rint((depth - offset) / scale * 65536.0)
    return np.clip(codes, 0, U16_MAX).astype(np.uint16)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_u16_png(codes: np.ndarray, compress_level: int = 0) -> bytes:
    """(H, W) uint16 -> bytes of a 16-bit grayscale PNG (lossless, every row with filter type 0).

    Written directly (signature, IHDR, one IDAT, IEND) rather than through PIL so that every row is
    unfiltered: :func:`decode_u16_png` then decodes it with one ``zlib.decompress`` and a reshape,
    ~10x faster than a general PNG decoder. Any PNG reader reads it (tests check PIL).
    """
    if codes.dtype != np.uint16 or codes.ndim != 2:
        raise ValueError(f"expected a 2-D uint16 array, got {codes.dtype} with shape {codes.shape}")
    height, width = codes.shape
    rows = np.zeros((height, 1 + 2 * width), dtype=np.uint8)  # filter byte 0, then big-endian samples
    rows[:, 1:] = codes.astype(">u2").view(np.uint8).reshape(height, 2 * width)
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit grayscale, no interlace
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)) + _png_chunk(b"IEND", b""))


def _decode_unfiltered_u16_png(data: bytes) -> np.ndarray | None:
    """Fast path for 16-bit grayscale PNGs whose rows are all unfiltered; None for anything else."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, idat, size = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, bits, colour, _, _, interlace = struct.unpack(">IIBBBBB", payload[:13])
            if bits != 16 or colour != 0 or interlace != 0:
                return None
            size = (height, width)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if size is None or not idat:
        return None
    height, width = size
    raw = zlib.decompress(b"".join(idat))  # adler32-checked
    if len(raw) != height * (1 + 2 * width):
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 2 * width)
    if rows[:, 0].any():
        return None  # filtered rows: leave them to PIL
    return rows[:, 1:].copy().view(">u2").astype(np.uint16)


def u16_from_image(image: Image.Image, what: str = "depth PNG") -> np.ndarray:
    """A PIL image of a 16-bit grayscale PNG -> (H, W) uint16; :class:`DataError` for any other kind.

    8-bit (``L``), palette or colour depth maps are rejected rather than silently rescaled: their
    precision is 256x lower than the release encoding and their scale is unknown.
    """
    if image.mode not in _SIXTEEN_BIT_MODES:
        bits = "8-bit" if image.mode in ("L", "P", "1", "LA") else f"mode {image.mode}"
        raise DataError(f"{what} is {bits} ({image.mode}); expected a 16-bit grayscale PNG (mode I;16)")
    array = np.array(image)
    if image.mode == "I":
        # 32-bit container (some writers): accept only when every value fits 16 bits.
        if array.min() < 0 or array.max() > U16_MAX:
            raise DataError(f"{what} holds values outside [0, 65535]; expected a 16-bit grayscale PNG")
    return array.astype(np.uint16)


def decode_u16_png(data: bytes) -> np.ndarray:
    """Bytes of a 16-bit grayscale PNG -> (H, W) uint16, exact (:class:`DataError` for 8-bit or colour)."""
    try:
        fast = _decode_unfiltered_u16_png(data)
    except (struct.error, zlib.error, ValueError):
        fast = None  # let PIL produce the diagnosis
    if fast is not None:
        return fast
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()
        return u16_from_image(image)


def encode_depth_png(depth: np.ndarray, scale: float = DEPTH_SCALE, offset: float = DEPTH_OFFSET) -> bytes:
    """(H, W) float depth (or uint16 codes, stored as they are) -> 16-bit PNG bytes in the release encoding."""
    depth = np.asarray(depth)
    codes = depth if depth.dtype == np.uint16 else u16_from_depth(depth, scale, offset)
    return encode_u16_png(codes)


def decode_depth_png(data: bytes, scale: float = DEPTH_SCALE, offset: float = DEPTH_OFFSET) -> np.ndarray:
    """16-bit PNG bytes -> (H, W) float32 depth ``v / 65536 * scale + offset``."""
    return depth_from_u16(decode_u16_png(data), scale, offset)
