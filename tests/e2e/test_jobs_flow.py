"""A PI starts a training job on the Models page in a real browser, follows it live on the Jobs page and cancels it.

This module runs its own ``streamlit run`` (overriding the shared server fixture): on a fresh workspace with a tiny
imported cohort and no model, started after the session's Ray cluster so that the server attaches to it through
``IOAI_RAY_ADDRESS`` (the environment it inherits) instead of starting an embedded cluster of its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from core.settings import pointing_at
from db import repo
from services.jobs import engine, store
from tests.e2e.conftest import Server, _create_pi, serving, settled, sign_in

RUNNING_TIMEOUT_MS = 60_000  # a Ray worker's first job imports torch: seconds on 2 cores


@pytest.fixture(scope="module")
def jobs_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh workspace with a 4-patient cohort imported, no model, and the e2e PI account."""
    from core.data.synth import CohortConfig, write_cohort
    from services.importer import import_manifest

    workspace = tmp_path_factory.mktemp("jobs_e2e_ws")
    with pointing_at(workspace):
        manifest = write_cohort(
            CohortConfig(n_patients=4, specimens_per_patient=(10, 14), height=64, width=80, seed=1),
            workspace / "cohort",
        )
        assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
    _create_pi(workspace)
    return workspace


@pytest.fixture(scope="module")
def streamlit_server(
    chromium_path: str, ray_cluster: str, jobs_workspace: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``streamlit run app/main.py`` on ``jobs_workspace``, attached to the session's cluster."""
    assert os.environ.get(engine.ADDRESS_ENV) == ray_cluster
    try:
        with serving(jobs_workspace, tmp_path_factory.mktemp("jobs_e2e_server") / "streamlit.log") as server:
            yield server
    finally:
        with pointing_at(jobs_workspace):
            engine.stop_supervisor()  # and any job still running on it


def _progress_text(card) -> str:
    return card.get_by_test_id("stProgress").inner_text().strip()


def test_pi_trains_follows_and_cancels_a_job(page: Page, streamlit_server: Server, jobs_workspace: Path) -> None:
    page.goto(streamlit_server.url)
    sign_in(page, streamlit_server.username, streamlit_server.password)

    # 1. Models: no model yet; the training form, filled in for a long tiny run.
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Models").click()
    expect(page.get_by_text("No models yet: train one with the form below")).to_be_visible()
    form = page.get_by_test_id("stForm").filter(has=page.get_by_role("button", name="Queue training"))
    form.get_by_test_id("stSelectbox").filter(has_text="Architecture").click()
    page.get_by_role("option", name="tiny_cnn", exact=True).click()
    for label, value in (("Epochs", "1000"), ("Image size (px)", "32"), ("Batch size", "8")):
        box = form.get_by_role("spinbutton", name=label)
        box.fill(value)
        box.press("Tab")
    form.get_by_role("textbox", name="Name (optional)").fill("e2e-never")
    form.get_by_role("button", name="Queue training").click()
    queued = page.get_by_test_id("stAlertContentSuccess").filter(has_text=re.compile(r"^Job \d+ queued"))
    expect(queued).to_be_visible()
    job_id = int(re.match(r"Job (\d+)", queued.inner_text()).group(1))

    # 2. The Jobs page follows it: the progress bar's message changes from one refresh to the next.
    page.get_by_role("link", name=f"Follow job {job_id} on the Jobs page").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    card = page.locator(f".st-key-jobs_job_{job_id}")
    header = card.get_by_test_id("stMarkdownContainer").first  # the state badge, the job's number and title
    expect(header).to_contain_text(f"Job {job_id} · Train e2e-never (tiny_cnn")
    expect(header).to_contain_text("running", timeout=RUNNING_TIMEOUT_MS)
    expect(card.get_by_test_id("stProgress")).to_contain_text(
        re.compile(r"epoch \d+/1000, loss"), timeout=RUNNING_TIMEOUT_MS
    )
    first = _progress_text(card)
    expect(card.get_by_test_id("stProgress")).not_to_have_text(first)
    assert re.search(r"epoch \d+/1000, loss", _progress_text(card))

    # 3. Cancel: the card says cancelled and offers Retry instead; nothing was registered.
    card.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text(f"Job {job_id} is cancelled.")).to_be_visible()
    expect(header).to_contain_text("cancelled")
    expect(header).not_to_contain_text("running")
    expect(card.get_by_role("button", name="Retry")).to_be_visible()
    expect(card.get_by_role("button", name="Cancel")).to_have_count(0)
    settled(page)
    with pointing_at(jobs_workspace):
        job = store.get_job(job_id)
        assert (job.state, job.submitted_by_name, job.params["epochs"]) == (
            "cancelled",
            streamlit_server.username,
            1000,
        )
        assert repo.list_models() == []
    assert not (jobs_workspace / "models" / "e2e-never").exists()
