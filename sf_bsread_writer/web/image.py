"""A 2-D channel as a small PNG for a browser (pure): downsample, auto-scale, colour map, encode.

Why the service renders images and the page does not draw raw data: a
1280x1024 uint16 frame is 2.6 MB raw (10 MB as JSON); downsampled to at most
``max_side`` pixels a side and encoded as an 8-bit palette PNG it is a few
tens of kB, and a control-room screen needs no more. The PNG is written with
``zlib`` and ``struct`` only (the format is small: signature, IHDR, PLTE,
IDAT, IEND), so no imaging library is needed.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["render_png", "render", "RenderedImage", "downsample", "autoscale", "scale_limits", "COLORMAP",
           "COLORMAP_ANCHORS"]


#: The colour map's anchors, evenly spaced from the low to the high end of the scale; the map interpolates
#: linearly between them, so a page draws the same colour bar as a CSS linear-gradient of these.
COLORMAP_ANCHORS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _colormap() -> np.ndarray:
    """256 RGB entries from dark blue through green to yellow (viridis-like, monotonic in lightness)."""
    anchors = np.array(COLORMAP_ANCHORS, dtype=float)
    positions = np.linspace(0.0, 1.0, len(anchors))
    steps = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(steps, positions, anchors[:, channel]) for channel in range(3)], axis=1
                    ).round().astype(np.uint8)


COLORMAP = _colormap()


def downsample(image: np.ndarray, max_side: int) -> np.ndarray:
    """Block means so that neither side exceeds ``max_side`` (integer factor, the same on both axes)."""
    image = np.asarray(image, dtype=np.float64)
    factor = max(1, -(-max(image.shape) // max_side))
    if factor == 1:
        return image
    rows, columns = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if rows == 0 or columns == 0:
        return image[::factor, ::factor]
    trimmed = image[:rows, :columns]
    return trimmed.reshape(rows // factor, factor, columns // factor, factor).mean(axis=(1, 3))


def scale_limits(image: np.ndarray, low_percentile: float = 0.5,
                 high_percentile: float = 99.5) -> tuple[float, float] | None:
    """The values shown as the colour map's two ends: two percentiles of the finite values (a few hot
    pixels do not wash the image out); ``high > low`` always. None: no finite value."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return None
    low, high = (float(limit) for limit in np.percentile(finite, [low_percentile, high_percentile]))
    return (low, high) if high > low else (low, low + 1.0)


def autoscale(image: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5) -> np.ndarray:
    """0..255 between :func:`scale_limits` (all 0 without a finite value)."""
    limits = scale_limits(image, low_percentile, high_percentile)
    if limits is None:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = limits
    scaled = (np.nan_to_num(image, nan=low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@dataclass(frozen=True)
class RenderedImage:
    """A PNG and its colour scale: pixel value ``low`` (and below) is the map's first colour, ``high`` (and
    above) its last (values of the shown pixels: block means when downsampled; None without a finite value)."""

    png: bytes
    low: float | None
    high: float | None


def render_png(image: np.ndarray, max_side: int = 512) -> bytes:
    """``image`` (2-D, any numeric dtype; numpy shape: rows, columns) as an auto-scaled, colour-mapped PNG."""
    return render(image, max_side).png


def render(image: np.ndarray, max_side: int = 512) -> RenderedImage:
    """:func:`render_png` with the scale it used (a page draws the colour bar from it)."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"an image has 2 dimensions, this value has {array.ndim}")
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    shown = downsample(array, max_side)
    limits = scale_limits(shown)
    indices = autoscale(shown)
    height, width = indices.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), indices], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, no interlace
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"PLTE", COLORMAP.tobytes())
           + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))
    return RenderedImage(png, *(limits if limits is not None else (None, None)))
