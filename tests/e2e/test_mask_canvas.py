"""The mask editor in Chromium: the real mouse draws on the demo app (tests/e2e/apps/mask_canvas_app.py), and the
masks Python received, at the image's resolution, are checked against where the pointer went on screen."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import serving, settled

APP = "tests/e2e/apps/mask_canvas_app.py"
WIDTH, HEIGHT = 200, 150  # the demo's picture
START_BOX = (slice(20, 60), slice(130, 180))  # the demo's start mask (rows, columns)
BRUSH_RADIUS = 4  # the default brush: 8 image pixels across
SLACK = 1.5  # image pixels of rounding between screen and image coordinates


@dataclass(frozen=True)
class Demo:
    url: str
    out: Path


@pytest.fixture(scope="module")
def demo(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo app on its own server (no trained workspace needed), writing what Python received under ``out``."""
    root = tmp_path_factory.mktemp("mask_canvas")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASK_CANVAS_OUT", str(root / "out"))
        with serving(root, root / "streamlit.log", script=APP) as server:
            yield Demo(url=server.url, out=root / "out")


@pytest.fixture
def page(browser, demo: Demo):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


class Editor:
    """The demo page, with the mouse in image coordinates and what Python received at each version."""

    def __init__(self, page, demo: Demo, run: str, query: str = "") -> None:
        from playwright.sync_api import expect

        self.page, self.folder = page, demo.out / run
        page.goto(f"{demo.url}/?run={run}{query}")
        self.canvas = page.get_by_role("application", name="Mask drawing area")
        expect(self.canvas).to_have_attribute("data-ready", "true")
        self.received(0)

    def button(self, name: str):
        return self.page.get_by_role("button", name=name, exact=True)

    def to_screen(self, x: float, y: float, zoom: float = 1.0, pan: tuple[float, float] = (0.0, 0.0)):
        """Where image point (x, y) is on the page: the canvas shows the image scaled to fit, then ``zoom`` and
        ``pan`` (CSS pixels) as the editor applies them."""
        box = self.canvas.bounding_box()
        scale = box["width"] / WIDTH * zoom
        return box["x"] + pan[0] + x * scale, box["y"] + pan[1] + y * scale

    def stroke(self, *points: tuple[float, float]) -> None:
        """Press, move through ``points`` (page coordinates) and release, as a reader's hand would."""
        self.page.mouse.move(*points[0])
        self.page.mouse.down()
        for point in points[1:]:
            self.page.mouse.move(*point, steps=8)
        self.page.mouse.up()

    def received(self, version: int) -> dict:
        """Wait until Python has handled ``version``; the summary it wrote, with the masks it stored."""
        from playwright.sync_api import expect

        expect(self.page.get_by_text(f"Python received version {version}", exact=True)).to_be_visible()
        summary = json.loads((self.folder / "state.json").read_text())
        assert summary["version"] == version and summary["error"] is None
        summary["masks"] = {name: np.asarray(Image.open(self.folder / f"{name}.png")) > 0 for name in summary["counts"]}
        assert all(mask.shape == (HEIGHT, WIDTH) for mask in summary["masks"].values())
        return summary


def _distance(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel centre from the segment a-b, in image pixels."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return np.hypot(xs - ax - t * dx, ys - ay - t * dy)


def _stroke_fits(mask: np.ndarray, a, b, radius: float = BRUSH_RADIUS, elsewhere: np.ndarray | None = None) -> None:
    """Every pixel well inside the stroke is set; none well outside it (or ``elsewhere``) is."""
    distance = _distance(a, b)
    assert mask[distance <= radius - SLACK].all()
    allowed = distance <= radius + SLACK
    if elsewhere is not None:
        allowed |= elsewhere
    assert not mask[~allowed].any()


def _box(x0: float, y0: float, x1: float, y1: float, grow: float = 0.0) -> np.ndarray:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    return (xs >= x0 - grow) & (xs <= x1 + grow) & (ys >= y0 - grow) & (ys <= y1 + grow)


def test_a_brush_stroke_and_a_polygon_are_stored_at_the_image_resolution(page, demo):
    editor = Editor(page, demo, "draw")
    editor.stroke(editor.to_screen(30, 40), editor.to_screen(90, 40))
    stroke = editor.received(1)["masks"]["region"]
    _stroke_fits(stroke, (30, 40), (90, 40))

    editor.button("Polygon").click()
    for corner in [(120, 90), (180, 90), (180, 140), (120, 140), (120, 90)]:  # the last click closes it
        page.mouse.click(*editor.to_screen(*corner))
    summary = editor.received(2)
    mask = summary["masks"]["region"]
    assert mask[_box(120, 90, 180, 140, grow=-SLACK)].all()
    assert not mask[~(_box(120, 90, 180, 140, grow=SLACK) | stroke)].any()
    assert not (stroke & ~mask).any() and summary["counts"]["region"] == int(mask.sum())


def test_the_eraser_undo_and_redo(page, demo):
    editor = Editor(page, demo, "erase")
    editor.stroke(editor.to_screen(30, 40), editor.to_screen(150, 40))
    drawn = editor.received(1)["masks"]["region"]
    _stroke_fits(drawn, (30, 40), (150, 40))

    editor.button("Eraser").click()
    page.get_by_role("slider", name="Brush size").focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")  # 8 -> 12 image pixels across
    editor.stroke(editor.to_screen(90, 20), editor.to_screen(90, 60))
    erased = editor.received(2)["masks"]["region"]
    gap = _distance((90, 20), (90, 60))
    assert not erased[gap <= 6 - SLACK].any()
    assert (erased == drawn)[gap > 6 + SLACK].all() and not (erased & ~drawn).any()

    page.keyboard.press("Control+z")
    assert (editor.received(3)["masks"]["region"] == drawn).all()
    page.keyboard.press("Control+Shift+z")
    assert (editor.received(4)["masks"]["region"] == erased).all()
    editor.button("Undo").click()
    assert (editor.received(5)["masks"]["region"] == drawn).all()
    editor.button("Redo").click()
    assert (editor.received(6)["masks"]["region"] == erased).all()


def test_drawing_after_zooming_and_panning_lands_under_the_pointer(page, demo):
    from playwright.sync_api import expect

    editor = Editor(page, demo, "zoom")
    box = editor.canvas.bounding_box()
    editor.button("Zoom in").click()  # x1.5 about the centre: the centre stays where it was
    expect(page.get_by_label("Zoom level")).to_have_text("150%")
    editor.button("Pan").click()
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    editor.stroke(centre, (centre[0] + 60, centre[1] + 45))
    pan = (-box["width"] / 4 + 60, -box["height"] / 4 + 45)

    editor.button("Brush").click()
    editor.stroke(editor.to_screen(60, 100, zoom=1.5, pan=pan), editor.to_screen(100, 100, zoom=1.5, pan=pan))
    first = editor.received(1)["masks"]["region"]
    _stroke_fits(first, (60, 100), (100, 100))

    # The wheel zooms about the pointer: a dot there lands on the image point that was under it before.
    point = (box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    scale = box["width"] / WIDTH * 1.5
    target = ((point[0] - box["x"] - pan[0]) / scale, (point[1] - box["y"] - pan[1]) / scale)
    page.mouse.move(*point)
    page.mouse.wheel(0, -100)
    expect(page.get_by_label("Zoom level")).to_have_text("225%")
    editor.stroke(point)
    dot = editor.received(2)["masks"]["region"] & ~first
    _stroke_fits(dot, target, target)


def test_no_region_clears_and_is_flagged_until_the_reader_draws_again(page, demo):
    from playwright.sync_api import expect

    editor = Editor(page, demo, "noregion")
    editor.stroke(editor.to_screen(40, 40), editor.to_screen(80, 60))
    assert editor.received(1)["counts"]["region"] > 0

    editor.button("No region").click()
    summary = editor.received(2)
    assert summary["no_region"] and summary["counts"]["region"] == 0
    expect(editor.button("No region")).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".mc-status")).to_have_text("No region marked.")

    editor.stroke(editor.to_screen(100, 100), editor.to_screen(140, 100))
    summary = editor.received(3)
    assert not summary["no_region"]
    _stroke_fits(summary["masks"]["region"], (100, 100), (140, 100))

    editor.button("Clear").click()
    summary = editor.received(4)
    assert summary["counts"]["region"] == 0 and not summary["no_region"]
    editor.button("Undo").click()
    _stroke_fits(editor.received(5)["masks"]["region"], (100, 100), (140, 100))


def test_the_start_mask_is_shown_and_can_be_edited(page, demo):
    editor = Editor(page, demo, "start", "&start=1")
    start = np.zeros((HEIGHT, WIDTH), dtype=bool)
    start[START_BOX] = True
    assert (editor.received(0)["masks"]["region"] == start).all()

    shot = np.asarray(Image.open(io.BytesIO(editor.canvas.screenshot())).convert("RGB")).astype(int)
    scale = shot.shape[1] / WIDTH
    inside, outside = shot[int(40 * scale), int(155 * scale)], shot[int(100 * scale), int(155 * scale)]
    assert inside[0] - inside[1] > 40, inside  # the overlay's red over the grey picture
    assert abs(outside[0] - outside[1]) < 10, outside

    editor.button("Eraser").click()
    editor.stroke(editor.to_screen(120, 40), editor.to_screen(190, 40))
    edited = editor.received(1)["masks"]["region"]
    cut = _distance((120, 40), (190, 40))
    assert not edited[cut <= BRUSH_RADIUS - SLACK].any()
    assert (edited == start)[cut > BRUSH_RADIUS + SLACK].all()


def test_two_layers_are_drawn_and_stored_apart(page, demo):
    editor = Editor(page, demo, "layers", "&layers=2")
    editor.button("Layer restrictive").click()
    editor.button("Polygon").click()
    for corner in [(20, 20), (80, 20), (50, 70)]:
        page.mouse.click(*editor.to_screen(*corner))
    page.mouse.dblclick(*editor.to_screen(50, 70))  # a double-click closes the polygon
    masks = editor.received(1)["masks"]
    assert masks["restrictive"][_box(45, 25, 55, 35)].all() and not masks["restrictive"][_box(90, 0, 200, 150)].any()
    assert not masks["intermediate"].any()

    editor.button("Layer intermediate").click()
    editor.button("Brush").click()
    editor.stroke(editor.to_screen(120, 100), editor.to_screen(180, 100))
    masks_after = editor.received(2)["masks"]
    _stroke_fits(masks_after["intermediate"], (120, 100), (180, 100))
    assert (masks_after["restrictive"] == masks["restrictive"]).all()


def test_a_disabled_editor_shows_the_start_and_only_lets_the_reader_look(page, demo):
    from playwright.sync_api import expect

    editor = Editor(page, demo, "disabled", "&start=1&disabled=1")
    for name in ("Brush", "Eraser", "Polygon", "Undo", "Clear", "No region"):
        expect(editor.button(name)).to_be_disabled()
    expect(page.get_by_role("slider", name="Brush size")).to_be_disabled()
    editor.button("Zoom in").click()
    expect(page.get_by_label("Zoom level")).to_have_text("150%")
    editor.stroke(editor.to_screen(20, 100), editor.to_screen(60, 100))  # the brush is selected, but inert
    page.keyboard.press("Control+z")
    page.wait_for_timeout(1000)  # an edit would be sent within milliseconds of the mouse going up
    settled(page)
    assert editor.received(0)["counts"]["region"] == 2000
