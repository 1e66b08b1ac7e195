"""The mask editor readers draw diagnostic regions with: a small Streamlit Components v2 component (plain JS on an HTML
canvas, assets in ``app/mask_canvas/``) and the server side that reads what it sends back.

The browser keeps one binary mask per layer at the image's own resolution and sends them, on stroke end only, as
8-bit grey PNG data URLs. What arrives is untrusted: ``decode_mask`` accepts nothing but a PNG of exactly the expected
size in grey or 1-bit mode, within a size limit, and ``parse_state`` refuses any other shape of value. A refused
value gives ``MaskState.masks = None`` with the reason in ``error``, never an exception or a mask of the wrong size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

__all__ = ["MAX_IMAGE_PIXELS", "MaskState", "decode_mask", "encode_mask", "mask_canvas", "parse_state"]

MAX_IMAGE_PIXELS = 4096 * 4096
LAYER_COLOURS = ("#ff2b2b", "#1c83e1", "#21c354", "#ffbd45")
_DATA_URL_PREFIX = "data:image/png;base64,"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: a PNG cut short lacks it
_MAX_VERSION = 10**9
_DISPLAY_HEIGHT = 520  # CSS pixels, unless the caller says otherwise
_ASSETS = Path(__file__).with_name("mask_canvas")

_COMPONENT = st.components.v2.component(
    "ioai.mask_canvas",
    html='<div class="mc-root"></div>',
    css=(_ASSETS / "mask_canvas.css").read_text(),
    js=(_ASSETS / "mask_canvas.js").read_text(),
)


@dataclass(frozen=True, eq=False)
class MaskState:
    """What the reader has drawn.

    ``masks`` maps each layer to a boolean array at the image's resolution (height, width); ``None`` when the browser
    sent a value that was refused (``error`` says why), so a caller never stores a mask it could not check.
    ``no_region`` is the reader's explicit "no region" (all masks empty); ``version`` counts edits in the browser
    (0: the start, untouched).
    """

    masks: Mapping[str, np.ndarray] | None
    no_region: bool
    version: int
    error: str | None = None


def encode_mask(mask: np.ndarray) -> str:
    """A boolean mask as an 8-bit grey PNG data URL (0 background, 255 region)."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return _DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def _max_png_bytes(width: int, height: int) -> int:
    """Generous room for an honest encoder (filter bytes, stored deflate blocks, chunking), nothing more."""
    return (width + 1) * height * 102 // 100 + 65_536


def decode_mask(value: object, width: int, height: int) -> np.ndarray | None:
    """The mask in a PNG data URL from the browser, or None unless it is exactly a ``width`` x ``height`` grey or
    1-bit PNG, whole (ending in IEND) and within the size limit. The header is checked before Pillow decodes
    anything; a pixel above 127 is region."""
    if not isinstance(value, str) or not value.startswith(_DATA_URL_PREFIX):
        return None
    limit = _max_png_bytes(width, height)
    if len(value) > len(_DATA_URL_PREFIX) + 4 * (limit // 3 + 1):
        return None
    try:
        raw = base64.b64decode(value[len(_DATA_URL_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) > limit or not raw.startswith(_PNG_SIGNATURE) or raw[12:16] != b"IHDR" or not raw.endswith(_PNG_END):
        return None
    if struct.unpack(">II", raw[16:24]) != (width, height):
        return None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            if image.size != (width, height) or image.mode not in ("1", "L") or getattr(image, "n_frames", 1) != 1:
                return None
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if pixels.shape != (height, width):
        return None
    return pixels.astype(bool) if pixels.dtype == bool else pixels > 127


def _refused(reason: str) -> MaskState:
    return MaskState(masks=None, no_region=False, version=0, error=reason)


def parse_state(value: object, *, fingerprint: str, layers: Sequence[str], width: int, height: int) -> MaskState | None:
    """The browser's value as a ``MaskState``: None while the browser has sent nothing for this image and start (a
    value with another fingerprint was drawn on something else), a refusal for anything malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _refused("the drawing is not an object")
    if value.get("fingerprint") != fingerprint:
        return None
    if set(value) != {"fingerprint", "version", "no_region", "masks"}:
        return _refused("the drawing has unexpected fields")
    version, no_region, masks = value["version"], value["no_region"], value["masks"]
    if type(version) is not int or not 0 < version <= _MAX_VERSION or type(no_region) is not bool:
        return _refused("the drawing's version or no-region flag is malformed")
    if not isinstance(masks, dict) or set(masks) != set(layers):
        return _refused("the drawing's layers are not the expected ones")
    decoded: dict[str, np.ndarray] = {}
    for name in layers:
        mask = decode_mask(masks[name], width, height)
        if mask is None:
            return _refused(f"layer {name!r} is not a {width}x{height} grey PNG")
        decoded[name] = mask
    if no_region and any(mask.any() for mask in decoded.values()):
        return _refused("the drawing says no region but has one")
    return MaskState(masks=decoded, no_region=no_region, version=version)


def _image_size(image_png: bytes) -> tuple[int, int]:
    if not image_png.startswith(_PNG_SIGNATURE):
        raise ValueError("mask_canvas needs the image as PNG bytes")
    with Image.open(io.BytesIO(image_png), formats=["PNG"]) as image:
        width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"the image has {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} a mask may have")
    return width, height


def _start_masks(
    layers: Sequence[str], start: Mapping[str, np.ndarray] | None, no_region: bool, width: int, height: int
) -> dict[str, np.ndarray]:
    start = start or {}
    if unknown := set(start) - set(layers):
        raise ValueError(f"start masks for unknown layers: {sorted(unknown)}")
    masks = {}
    for name in layers:
        mask = np.asarray(start[name], dtype=bool) if name in start else np.zeros((height, width), dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"start mask {name!r} is {mask.shape}, the image is {(height, width)}")
        masks[name] = mask
    if no_region and any(mask.any() for mask in masks.values()):
        raise ValueError("a start with no region cannot have a region")
    return masks


def mask_canvas(
    image_png: bytes,
    *,
    key: str,
    layers: Sequence[str] = ("region",),
    start: Mapping[str, np.ndarray] | None = None,
    start_no_region: bool = False,
    disabled: bool = False,
    height: int | None = None,
) -> MaskState:
    """Show the mask editor on ``image_png`` and return what the reader has drawn so far.

    ``layers`` name the masks (at most four, e.g. ``("intermediate", "restrictive")``), each drawn in its own colour;
    ``start`` gives editable starting masks (the AI-aided arm's thresholded heatmap, or the reader's previous version)
    and ``start_no_region`` a previous explicit "no region". ``disabled`` shows the masks read-only (zoom and pan
    still work); ``height`` caps the displayed height in CSS pixels (default 520). Use one ``key`` per reader, case
    and arm: a new image or start under the same key starts afresh.
    """
    names = tuple(layers)
    if not 1 <= len(names) <= len(LAYER_COLOURS) or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"layers must be 1 to {len(LAYER_COLOURS)} distinct non-empty names, got {names!r}")
    width, image_height = _image_size(image_png)
    start_masks = _start_masks(names, start, start_no_region, width, image_height)
    start_urls = {name: encode_mask(mask) for name, mask in start_masks.items() if mask.any()}
    identity = json.dumps([names, start_urls, start_no_region]).encode()
    fingerprint = hashlib.sha256(image_png + identity).hexdigest()[:24]
    data = {
        "fingerprint": fingerprint,
        "image": _DATA_URL_PREFIX + base64.b64encode(image_png).decode("ascii"),
        "width": width,
        "height": image_height,
        "layers": [{"name": name, "colour": colour} for name, colour in zip(names, LAYER_COLOURS, strict=False)],
        "start": start_urls,
        "startNoRegion": start_no_region,
        "disabled": disabled,
        "maxHeight": height or _DISPLAY_HEIGHT,
    }
    result = _COMPONENT(
        key=key, data=data, default={"drawing": None}, on_drawing_change=lambda: None, width="stretch", height="content"
    )
    drawn = parse_state(result.get("drawing"), fingerprint=fingerprint, layers=names, width=width, height=image_height)
    return drawn if drawn is not None else MaskState(masks=start_masks, no_region=start_no_region, version=0)
