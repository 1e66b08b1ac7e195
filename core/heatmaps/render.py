"""Turning maps into pictures: a perceptual colormap (Turbo) and alpha blending over the displayed image."""

from __future__ import annotations

from functools import cache

import numpy as np
from plotly.colors import hex_to_rgb, sequential

__all__ = ["colorize", "overlay", "to_uint8"]


@cache
def _lut() -> np.ndarray:
    anchors = np.array([hex_to_rgb(c) if c.startswith("#") else _rgb(c) for c in sequential.Turbo], dtype=float)
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
    return _lut()[to_uint8(heatmap)]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend the coloured map over the displayed image ((H, W) or (H, W, 3) floats in [0, 1]); uint8 RGB out."""
    base = np.asarray(image, dtype=np.float32)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    if base.shape[:2] != heatmap.shape:
        raise ValueError(f"image {base.shape[:2]} and heatmap {heatmap.shape} differ in size")
    color = colorize(heatmap).astype(np.float32) / 255.0
    return to_uint8((1.0 - alpha) * base + alpha * color)
