"""Pure pieces of blind reading: each reader's stable case order and the pictures a reader's browser receives.

No database and no Streamlit here; ``services.studies`` puts them together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image as PILImage

from core.data.store import png_bytes
from core.heatmaps.render import COLORMAPS, lut, to_uint8

__all__ = ["COLORMAPS", "DEFAULT_COLORMAP", "blind_png", "fit_side", "reader_order", "view_size", "windowed"]

DEFAULT_COLORMAP = "Inferno"


def reader_order(case_ids: Sequence[int], study_id: int, reader_id: int, arm_id: int) -> list[int]:
    """``case_ids`` shuffled for one reader in one arm: the same order in every session, a different order per
    reader and arm, independent of the order ``case_ids`` come in.

    The seed is the first 8 bytes of sha256("study:reader:arm"), so the order depends on nothing but these ids.
    """
    digest = hashlib.sha256(f"{study_id}:{reader_id}:{arm_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    ordered = np.sort(np.asarray(case_ids, dtype=np.int64))
    return [int(i) for i in ordered[rng.permutation(len(ordered))]]


def windowed(gray: np.ndarray, low: float = 0.0, high: float = 1.0, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """A single-channel [0, 1] image through an intensity window [low, high] and a colormap: (H, W, 3) uint8.

    Values below ``low`` take the colormap's first colour, above ``high`` its last, as on a radiology workstation.
    """
    if gray.ndim != 2:
        raise ValueError(f"windowing needs a single-channel image, not shape {gray.shape}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"the window needs 0 <= low < high <= 1, not [{low}, {high}]")
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    scaled = (np.asarray(gray, dtype=np.float32) - low) / (high - low)
    return lut(colormap)[to_uint8(scaled)]


def fit_side(picture: np.ndarray, side: int) -> np.ndarray:
    """Downscale (Lanczos) so the longer side is at most ``side``; smaller pictures come back unchanged."""
    if max(picture.shape[:2]) <= side:
        return picture
    image = PILImage.fromarray(picture)
    image.thumbnail((side, side), PILImage.Resampling.LANCZOS)
    return np.asarray(image)


def view_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) of a ``height`` x ``width`` picture after :func:`fit_side` with ``side``, without the pixels:
    Pillow's thumbnail rule (the aspect ratio kept, each side rounded to the nearer whole pixel that keeps it
    best)."""
    if max(height, width) <= side:
        return height, width
    aspect = width / height

    def nearest(number: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    x, y = side, side
    if x / y >= aspect:
        x = nearest(y * aspect, lambda n: abs(aspect - n / y))
    else:
        y = nearest(x / aspect, lambda n: 0 if n == 0 else abs(aspect - x / n))
    return y, x


def blind_png(picture: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) picture with nothing but pixels: no text chunks, no EXIF, no ICC
    profile, no time stamp. Level 1 compression: pixels reach the browser sooner than the bytes saved would."""
    if picture.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, not {picture.dtype}")
    return png_bytes(picture, compress_level)
