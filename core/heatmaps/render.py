"""Turning maps into pictures: a perceptual colormap (Turbo) and alpha blending over the displayed image."""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image as PILImage
from plotly.colors import hex_to_rgb, sequential

__all__ = ["COLORMAPS", "colorize", "lut", "overlay", "resize_map", "to_uint8"]

COLORMAPS = ("Inferno", "Viridis", "Gray", "Turbo")  # plotly's sequential scales (Gray: greyscale)


@cache
def lut(name: str = "Turbo") -> np.ndarray:
    """A 256-entry uint8 RGB lookup table for one of ``COLORMAPS``."""
    if name == "Gray":
        return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAPS)}")
    scale = getattr(sequential, name)
    anchors = np.array([hex_to_rgb(c) if c.startswith("#") else _rgb(c) for c in scale], dtype=float)
    positions = np.linspace(0.0, 1.0, len(anchors))
    grid = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(grid, positions, anchors[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)


def _rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in css[css.index("(") + 1 : css.index(")")].split(","))
    return r, g, b


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255 bytes."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] to an (H, W, 3) uint8 Turbo picture."""
    return lut()[to_uint8(heatmap)]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend the coloured map over the displayed image ((H, W) or (H, W, 3) floats in [0, 1]); uint8 RGB out."""
    base = np.asarray(image, dtype=np.float32)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    if base.shape[:2] != heatmap.shape:
        raise ValueError(f"image {base.shape[:2]} and heatmap {heatmap.shape} differ in size")
    color = colorize(heatmap).astype(np.float32) / 255.0
    return to_uint8((1.0 - alpha) * base + alpha * color)


def resize_map(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A [0, 1] map resized (bilinear) to ``shape``; stored mosaic maps are kept at reduced resolution."""
    if heatmap.shape == tuple(shape):
        return heatmap.astype(np.float32)
    resized = PILImage.fromarray(heatmap.astype(np.float32), mode="F").resize(shape[::-1], PILImage.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)
