"""The mask editor alone, for tests/e2e/test_mask_canvas.py: a generated 200x150 grey picture, and what Python
received written where the test can read it.

Query parameters: ``run`` names the output folder (``$MASK_CANVAS_OUT/<run>/``: ``state.json`` and one
``<layer>.png`` per layer, 0/255); ``start=1`` starts the first layer with ``START_BOX``; ``layers=2`` draws the two
layers of seed 000 (intermediate and restrictive features); ``disabled=1`` shows it read-only. Started as
``python -m streamlit run`` from the repository root, so ``app`` imports.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from app.mask_canvas import mask_canvas

WIDTH, HEIGHT = 200, 150
START_BOX = (slice(20, 60), slice(130, 180))  # rows, columns
DISPLAY_HEIGHT = 450


def _picture() -> bytes:
    """A grey gradient with a brighter disc: grey on purpose, so the coloured overlay is told apart on screen."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    grey = 40 + 80 * xs / WIDTH + 60 * (((xs - 70) ** 2 + (ys - 80) ** 2) < 30**2)
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _write(folder: Path, state) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    masks = state.masks or {}
    for name, mask in masks.items():
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(folder / f"{name}.png")
    summary = {
        "version": state.version,
        "no_region": state.no_region,
        "error": state.error,
        "shapes": {name: list(mask.shape) for name, mask in masks.items()},
        "counts": {name: int(mask.sum()) for name, mask in masks.items()},
    }
    partial = folder / "state.json.partial"
    partial.write_text(json.dumps(summary))
    partial.replace(folder / "state.json")


st.set_page_config(page_title="Mask editor demo", layout="centered")
run = st.query_params.get("run", "default")
if not re.fullmatch(r"[a-z0-9_-]{1,40}", run):
    st.error("run must be 1 to 40 lower-case letters, digits, - or _.")
    st.stop()
layers = ("intermediate", "restrictive") if st.query_params.get("layers") == "2" else ("region",)
start = None
if st.query_params.get("start") == "1":
    start = {layers[0]: np.zeros((HEIGHT, WIDTH), dtype=bool)}
    start[layers[0]][START_BOX] = True

disabled = st.query_params.get("disabled") == "1"
state = mask_canvas(
    _picture(), key=f"mask_demo_{run}", layers=layers, start=start, disabled=disabled, height=DISPLAY_HEIGHT
)
if out := os.environ.get("MASK_CANVAS_OUT"):
    _write(Path(out) / run, state)
st.text(f"Python received version {state.version}")
if state.error:
    st.error(state.error)
