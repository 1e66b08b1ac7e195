"""A PI reopens a triaged CLE clip on the Diagnose page in a real browser and clicks a point of its timeline: the
frame under the point is shown (decoded from the stored clip when it is no top frame), with its probability.

This module runs its own ``streamlit run`` on a fresh workspace with a tiny CLE model and one stored triage."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from core.data.localization_set import generate_set
from core.data.synth_cle import make_cle_clip, write_clip
from core.settings import pointing_at
from core.train import TrainConfig
from db import repo
from db.session import read_scope
from services.clips import triage_and_store, triage_view
from services.localization import train_on_set
from services.predictions import load_predictor
from tests.e2e.conftest import PI_USERNAME, Server, _create_pi, serving, settled, sign_in

N_FRAMES = 60


@pytest.fixture(scope="module")
def clip_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A fresh workspace: the e2e PI, a tiny CLE model, and one clip the PI triaged (2 top frames)."""
    workspace = tmp_path_factory.mktemp("clip_e2e_ws")
    _create_pi(workspace)
    cle_set = generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=64, seed=3)
    clip = make_cle_clip(N_FRAMES, 64, seed=4, fps=20.0)
    path = write_clip(clip.frames, tmp_path_factory.mktemp("clip") / "site.tif", fps=clip.fps)
    with pointing_at(workspace):
        config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
        model, _ = train_on_set(config, cle_set, name="cle-e2e", log=lambda _: None)
        with read_scope() as s:
            pi = next(u for u in repo.list_users(s) if u.username == PI_USERNAME)
        stored = triage_and_store(load_predictor(model, "cpu"), model, path, user_id=pi.id, top_k=2)
        view = triage_view(stored.triage_id)
    return workspace, view


@pytest.fixture(scope="module")
def streamlit_server(chromium_path: str, clip_workspace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workspace, _ = clip_workspace
    with serving(workspace, tmp_path_factory.mktemp("clip_e2e_server") / "streamlit.log") as server:
        yield server


def _frame_caption(page: Page):
    return page.locator("figcaption").filter(has_text=re.compile(r"^Frame \d+"))


def test_a_click_on_the_timeline_shows_that_frame(page: Page, streamlit_server: Server, clip_workspace) -> None:
    _, view = clip_workspace
    tops = [t["frame"] for t in view["top"]]
    page.set_viewport_size({"width": 1400, "height": 2400})
    page.goto(f"{streamlit_server.url}/diagnose")
    sign_in(page, streamlit_server.username, streamlit_server.password)
    page.get_by_text("A clip", exact=True).click()
    settled(page)
    expect(page.get_by_role("combobox", name="Heatmap")).to_have_value("MLCAM-LICI")  # the model's own map
    history = page.get_by_test_id("stExpander").filter(has_text="Your earlier clips")
    caption = _frame_caption(page)
    opener = history.get_by_role("button", name="Open clip")
    # a click sent while a rerun is starting can be dropped (the expander's too: then it stays closed and the button
    # never shows), or find the button replaced by the rerun (detached from the page): a person looks and clicks again
    for attempt in range(4):
        try:
            if not history.evaluate("e => (e.tagName === 'DETAILS' ? e : e.querySelector('details')).open"):
                history.locator("summary").click()
                settled(page)
            opener.click(timeout=8_000)  # the newest clip is chosen
            settled(page)
            expect(caption).to_have_count(1, timeout=10_000)
            break
        except (AssertionError, PlaywrightTimeout):
            if attempt == 3:
                raise
    expect(caption).to_contain_text(f"Frame {tops[0]} ")  # opens on the most diagnostic frame
    # click a point of the timeline that is no top frame: the frames line's points are drawn in frame order
    target = next(i for i in range(N_FRAMES) if i not in tops and abs(i - tops[0]) > 3)
    chart = page.get_by_test_id("stPlotlyChart").first
    chart.locator("g.trace.scatter").first.locator("path.point").nth(target).click(force=True)
    settled(page)
    expect(caption).to_contain_text(f"Frame {target} ")
    expect(caption).to_contain_text("probability 0.")
