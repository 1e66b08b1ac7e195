"""A PI diagnoses a real photo and a corrupt file in a real browser, then finds the result again on the Data page."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import skimage.data
from playwright.sync_api import Locator, Page, expect

from tests.e2e.conftest import Server, settled, sign_in

SCREENSHOT = Path("/tmp/e2e_diagnose.png")
MODEL_TIMEOUT_MS = 60_000  # first diagnosis loads the model and computes Grad-CAM on 2 CPU cores


def _grid_rows(dataframe: Locator, count: int) -> list[dict[str, str]]:
    """The ``count`` rows an ``st.dataframe`` shows, as header -> text.

    The grid paints on a canvas; once it has keyboard focus it adds an accessible table of the visible rows inside
    the canvas (as a screen reader would read it), which this reads. That table follows a rerun (a new filter) with
    a lag, so this waits until it holds the expected number of rows.
    """
    expect(dataframe).to_be_visible()
    canvas = dataframe.get_by_test_id("data-grid-canvas")
    canvas.focus()
    table = canvas.locator("table[role=grid]")
    expect(table.locator("tbody tr")).to_have_count(count)
    return table.evaluate(
        """table => {
            const headers = [...table.querySelectorAll("thead th")].map(th => th.textContent.trim());
            return [...table.querySelectorAll("tbody tr")].map(tr => Object.fromEntries(
                [...tr.querySelectorAll("td")].map((td, i) => [headers[i], td.textContent.trim()])));
        }"""
    )


def _filtered_tab(page: Page, tab: str, text: str) -> Locator:
    """Open a Data page tab and type ``text`` into its row filter; the tab's panel."""
    page.get_by_role("tab", name=tab).click()
    panel = page.get_by_role("tabpanel").filter(visible=True)
    expect(panel.get_by_text(re.compile(r"^\d+ of \d+ rows$"))).to_be_visible()
    box = panel.get_by_role("textbox", name="Filter rows containing")
    box.fill(text)
    box.press("Enter")
    # Wait for the rerun the filter starts to end: a deferred download button is only valid in the run that drew it
    # (Streamlit drops the callable of the run before), so clicking one mid-rerun downloads nothing.
    page.wait_for_timeout(500)
    settled(page)
    expect(panel.get_by_text(re.compile(r"^[1-9]\d* of \d+ rows$"))).to_be_visible()
    return panel


def _screenshot_whole_page(page: Page, path: Path) -> None:
    """Streamlit scrolls inside its main container, so a full-page shot needs a viewport as tall as the content."""
    viewport = page.viewport_size
    assert viewport is not None
    height = page.get_by_test_id("stMain").evaluate("main => main.scrollHeight")
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], int(height))})
    try:
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(viewport)


def _broken_png(tmp_path: Path) -> Path:
    """The first half of a real PNG: a valid signature and header, then the data stops."""
    whole = Path(skimage.data.data_dir, "camera.png").read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(whole[: len(whole) // 2])
    return broken


def test_pi_diagnoses_uploads_and_finds_them_in_the_data_page(
    page: Page, streamlit_server: Server, tmp_path: Path
) -> None:
    retina = Path(os.path.join(skimage.data.data_dir, "retina.jpg"))
    broken = _broken_png(tmp_path)

    # 1. Sign in as the PI.
    page.goto(streamlit_server.url)
    sign_in(page, streamlit_server.username, streamlit_server.password)
    expect(page.get_by_text("Signed in as")).to_be_visible()

    # 2. Diagnose: WL, two files at once.
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Diagnose", exact=True).click()
    expect(page.get_by_role("heading", name="Diagnose")).to_be_visible()
    page.get_by_test_id("stRadio").get_by_text("WL", exact=True).click()
    uploader = page.get_by_test_id("stFileUploader")
    expect(uploader.get_by_text(re.compile(r"^WL specimen images"))).to_be_visible()
    uploader.locator("input[type=file]").set_input_files([retina, broken])
    expect(uploader.get_by_text("retina.jpg")).to_be_visible()
    expect(uploader.get_by_text("broken.png")).to_be_visible()
    page.get_by_role("button", name="Diagnose").click()

    # 3. Results: the corrupt file is named in an error, the photo is in the table, the viewer shows both images.
    error = page.get_by_test_id("stAlertContentError").filter(has_text="broken.png")
    expect(error).to_be_visible(timeout=MODEL_TIMEOUT_MS)
    expect(error).to_have_text(re.compile(r"^broken\.png was not diagnosed: \w"))
    expect(page.get_by_role("heading", name="Result", exact=True)).to_be_visible()
    results = _grid_rows(page.get_by_test_id("stDataFrame").filter(visible=True).first, count=1)
    assert [row["image"] for row in results] == ["retina.jpg"], results
    assert results[0]["decision"] in ("tumor", "non-tumor"), results
    assert 0.0 <= float(results[0]["probability"]) <= 1.0, results
    original = page.get_by_test_id("stHtml").filter(has_text="Original").filter(visible=True)
    overlay = page.get_by_test_id("stHtml").filter(has_text=re.compile(r"^Grad-CAM: warm colours")).filter(visible=True)
    for viewer_image in (original, overlay):
        expect(viewer_image).to_have_count(1)
        img = viewer_image.locator("img")
        expect(img).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        # the patient's picture is inside the page, not a file at a URL that works without signing in
        assert img.get_attribute("src").startswith("data:image/png;base64,")
    sources = page.locator("img").evaluate_all("images => images.map(i => i.getAttribute('src') || '')")
    assert not [s for s in sources if "/media/" in s], sources
    _screenshot_whole_page(page, SCREENSHOT)

    # 4. A reload ends the Streamlit session: the same URL asks to sign in again, then shows the page asked for.
    page.reload()
    sign_in(page, streamlit_server.username, streamlit_server.password)
    expect(page.get_by_role("heading", name="Diagnose")).to_be_visible()
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Data", exact=True).click()
    expect(page.get_by_role("heading", name="Data")).to_be_visible()
    # Only the good file was kept: this PI's one upload is retina.jpg (other tests may add their own uploads).
    uploads = _filtered_tab(page, "Uploads", streamlit_server.username)
    expect(uploads.get_by_text(re.compile(r"^1 of \d+ rows$"))).to_be_visible()
    kept = _grid_rows(uploads.get_by_test_id("stDataFrame"), count=1)
    assert [(row["user"], row["original_name"]) for row in kept] == [(streamlit_server.username, "retina.jpg")], kept
    predictions = _filtered_tab(page, "Predictions", "retina.jpg")
    with page.expect_download() as download_info:
        predictions.get_by_role("button", name="Download CSV").click()
    download = download_info.value
    assert download.suggested_filename == "predictions.csv"
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    ours = [row for row in rows if row["upload_id"] == kept[0]["id"]]
    assert len(ours) == 1, rows
    assert (ours[0]["image"], ours[0]["model"], ours[0]["task"]) == ("retina.jpg", "tiny-WL", "tumor"), ours
    assert not any("broken.png" in row.values() for row in rows), rows
