"""Reader studies of CLE frames and of RCM mosaics in a real browser, on a workspace whose cases were imported from a
CLE cohort (clips, biopsy sites, per-stretch labels) and RCM mosaics: a reader answers "diagnostic?" on frames and
"aspecific?" on mosaics (with the stitched CAM of an aided arm over them), every answer is stored once, and nothing
the browser receives names the frame's specimen, site, clip or patient, or the truth."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from core.data.synth_cle import write_cle_cohort
from core.data.synth_rcm import write_rcm_cohort
from core.reading import reader_order
from core.settings import pointing_at
from db import repo
from db.models import ArmCase, Clip, Patient, Read, Specimen, SpecimenImage, StudyCase
from db.session import init_db, session_scope
from services import studies
from services.importer import import_manifest
from services.studies import ArmSpec
from services.study_ai import prepare_study_ai
from tests.conftest import train_tiny_rcm
from tests.e2e.conftest import EXPECT_TIMEOUT_MS, _create_pi, serving, settled, sign_in
from tests.e2e.test_reading_flow import _capture, _leaks, _without_pictures

PASSWORD = "pw-reader-frames"
DONE = "You have read every case of this study. Thank you."


@dataclass(frozen=True)
class Workspace:
    root: Path
    url: str
    rcm_model_id: int

    @property
    def db(self) -> str:
        return f"sqlite:///{self.root / 'study.db'}"


@pytest.fixture(scope="module")
def frames_server(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """The app on its own workspace: a CLE cohort of two patients (one clip each, a TIFF and an MP4), two RCM
    mosaics (one with aspecific regions, one benign) and a tiny RCM patch classifier."""
    root = tmp_path_factory.mktemp("frames_e2e")
    data = tmp_path_factory.mktemp("frames_data")
    with pointing_at(root):
        init_db()
        cle = write_cle_cohort(data / "cle", patients=2, sites_per_patient=1, frames_per_clip=24, size=64, step=6)
        for manifest in (cle, write_rcm_cohort(data / "rcm", mosaics=2, size=128)):
            report = import_manifest(manifest)
            assert not report.errors, report.errors
        model = train_tiny_rcm("tiny-RCM-e2e")
    _create_pi(root)
    with serving(root, tmp_path_factory.mktemp("frames_server") / "streamlit.log") as server:
        yield Workspace(root, server.url, model.id)


@pytest.fixture
def page(browser: Browser, frames_server: Workspace) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _study(ws: Workspace, task: str, modality: str, arm: ArmSpec, per_truth: int) -> tuple[int, int, str, list[int]]:
    """A study of ``per_truth`` cases of each truth with one arm and one new reader: (study id, arm id, reader's
    username, case ids in the reader's order)."""
    tag = uuid.uuid4().hex[:8]
    with pointing_at(ws.root), session_scope(ws.db) as s:
        reader = repo.create_user(s, f"frames-r-{tag}", PASSWORD, "reader")
        pool = studies.eligible_specimens(s, task=task, modalities=[modality], splits=("train", "val", "test"))
        chosen = [int(i) for i in pool.groupby("truth").head(per_truth)["specimen_id"]]
        info = studies.create_study(
            s, title=f"{task} {tag}", task=task, specimen_ids=chosen, arms=[arm], reader_ids=[reader.id]
        )
        case_ids = list(s.scalars(select(StudyCase.id).where(StudyCase.study_id == info.id)))
        order = reader_order(case_ids, info.id, reader.id, info.arms[0].id)
    return info.id, info.arms[0].id, reader.username, order


def _secrets(ws: Workspace, case_id: int, arm_id: int) -> dict[str, str]:
    """What must never reach the reader about a case: its token, specimen and patient code, biopsy site, the clip it
    came from, and the stored image's path, file name and sha256."""
    with session_scope(ws.db) as s:
        token, code, patient, site, path, sha, clip = s.execute(
            select(
                ArmCase.token, Specimen.code, Patient.code, Specimen.site, SpecimenImage.path, SpecimenImage.sha256,
                Clip.original_name,
            )
            .join(StudyCase, ArmCase.case_id == StudyCase.id)
            .join(Specimen, StudyCase.specimen_id == Specimen.id)
            .join(Patient, Specimen.patient_id == Patient.id)
            .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
            .outerjoin(Clip, Clip.id == SpecimenImage.clip_id)
            .where(StudyCase.id == case_id, ArmCase.arm_id == arm_id)
        ).one()  # fmt: skip
    found = {"token": token, "specimen": code, "patient": patient, "path": path, "file": Path(path).name, "sha": sha}
    found |= {"site": site} if site else {}
    return found | ({"clip": clip} if clip else {})


def _reads(ws: Workspace, username: str) -> list[tuple[int, int, int]]:
    with session_scope(ws.db) as s:
        reader = next(u for u in repo.list_users(s) if u.username == username)
        return [
            tuple(r)
            for r in s.execute(
                select(Read.case_id, Read.version, Read.label).where(Read.reader_id == reader.id).order_by(Read.id)
            )
        ]


def _read_all(page: Page, ws: Workspace, study_id: int, username: str, arm: str, labels: list[str]) -> None:
    """Open the study, sign in, and answer each case with the next of ``labels``, checking the position line."""
    page.goto(f"{ws.url}/read?study={study_id}")
    sign_in(page, username, PASSWORD)
    for k, label in enumerate(labels, start=1):
        position = page.get_by_test_id("stMarkdownContainer").filter(has_text=f"Arm 1 of 1: {arm} · case {k} of ")
        expect(position).to_be_visible()
        settled(page)
        expect(page.get_by_test_id("stPlotlyChart").locator("image")).to_have_count(1)
        form = page.get_by_test_id("stForm")
        form.get_by_test_id("stRadio").filter(has_text="Diagnosis").get_by_text(label, exact=True).click()
        form.get_by_test_id("stRadio").filter(has_text="Confidence").get_by_text("3", exact=True).click()
        page.get_by_role("button", name="Submit answer").click()
        if k < len(labels):
            expect(
                page.get_by_test_id("stMarkdownContainer").filter(has_text=f"Arm 1 of 1: {arm} · case {k + 1} of ")
            ).to_be_visible()
    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text=DONE)).to_have_text(DONE)


def test_a_reader_reads_cle_frames_blind_to_specimen_site_clip_and_truth(page: Page, frames_server: Workspace) -> None:
    ws = frames_server
    study_id, arm_id, username, order = _study(ws, "diagnostic", "CLE", ArmSpec("CLE frames", "CLE"), per_truth=2)
    received = _capture(page)
    answers = ["diagnostic", "non-diagnostic", "diagnostic", "non-diagnostic"]
    _read_all(page, ws, study_id, username, "CLE frames", answers)
    stored = _reads(ws, username)
    assert sorted(case for case, _, _ in stored) == sorted(order)
    assert [(case, version, label) for case, version, label in stored] == [
        (case, 1, int(answer == "diagnostic")) for case, answer in zip(order, answers, strict=True)
    ]
    everything = "\n".join(received)
    assert "data:image/png;base64,<png>" in _without_pictures(everything) and username in everything
    for case_id in order:
        secrets = _secrets(ws, case_id, arm_id)
        assert {"site", "clip"} <= set(secrets)  # the frames came from clips of biopsy sites
        assert _leaks(everything, secrets) == [], secrets
    assert "Truth" not in everything and "truth" not in everything


def test_a_reader_reads_rcm_mosaics_with_the_stitched_map_of_an_aided_arm(page: Page, frames_server: Workspace) -> None:
    ws = frames_server
    arm = ArmSpec("RCM + AI", "RCM", model_id=ws.rcm_model_id, show_decision=True, heatmap_method="default")
    study_id, arm_id, username, order = _study(ws, "aspecific", "RCM", arm, per_truth=1)
    with pointing_at(ws.root):
        assert prepare_study_ai(study_id) == len(order)  # the PI's page does this when the study is created
    page.goto(f"{ws.url}/read?study={study_id}")
    sign_in(page, username, PASSWORD)
    expect(page.get_by_text("heatmap over the image", exact=False)).to_be_visible()
    page.goto("about:blank")
    _read_all(page, ws, study_id, username, "RCM + AI", ["aspecific", "benign"])
    stored = _reads(ws, username)
    assert [(case, version, label) for case, version, label in stored] == [(order[0], 1, 1), (order[1], 1, 0)]


def test_a_reader_draws_the_diagnostic_region_of_each_frame_and_the_mask_is_stored(
    page: Page, frames_server: Workspace
) -> None:
    """A regions study of CLE frames: the reader draws a stroke with the mouse on the first frame and says "No
    region" on the second; the stored masks are at the frame's resolution, cover where the pointer went (image
    coordinates), and the reads' labels follow (1 drawn, 0 none)."""
    from db.models import Annotation
    from services.studies import load_mask

    ws = frames_server
    tag = uuid.uuid4().hex[:8]
    with pointing_at(ws.root), session_scope(ws.db) as s:
        reader = repo.create_user(s, f"frames-d-{tag}", PASSWORD, "reader")
        pool = studies.eligible_specimens(s, task="diagnostic", modalities=["CLE"], splits=("train", "val", "test"))
        chosen = [int(i) for i in pool["specimen_id"][:2]]
        info = studies.create_study(
            s, title=f"regions {tag}", task="diagnostic", specimen_ids=chosen, arms=[ArmSpec("CLE", "CLE")],
            reader_ids=[reader.id], question="regions",
        )  # fmt: skip
    page.goto(f"{ws.url}/read?study={info.id}")
    sign_in(page, reader.username, PASSWORD)
    canvas = page.get_by_role("application", name="Mask drawing area")
    expect(canvas).to_have_attribute("data-ready", "true")
    box = canvas.bounding_box()
    scale = box["width"] / 64  # the frames are 64 px square, shown larger
    start, end = (16, 20), (48, 20)  # image coordinates of the stroke
    page.mouse.move(box["x"] + start[0] * scale, box["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * scale, box["y"] + end[1] * scale, steps=10)
    page.mouse.up()
    expect(page.get_by_text(re.compile(r"^Will be saved: [\d,]+ px of region\.$"))).to_be_visible()  # the server has it
    settled(page)
    page.get_by_role("button", name="Submit drawing").click()
    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text="Drawing saved.")).to_be_visible()
    expect(canvas).to_have_attribute("data-ready", "true")
    expect(page.get_by_text("Nothing drawn yet.", exact=True)).to_be_visible()
    page.get_by_role("button", name="No region", exact=True).click()
    expect(page.get_by_text("Will be saved: no region.", exact=True)).to_be_visible()
    settled(page)
    page.get_by_role("button", name="Submit drawing").click()
    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text=DONE)).to_have_text(DONE)
    with pointing_at(ws.root), session_scope(ws.db) as s:
        rows = s.execute(
            select(Annotation, Read.label).join(Read, Read.id == Annotation.read_id)
            .where(Annotation.reader_id == reader.id).order_by(Annotation.id)
        ).all()  # fmt: skip
        masks = [load_mask(a.layers["region"]["path"]) for a, _ in rows]
    assert [(a.empty, label) for a, label in rows] == [(False, 1), (True, 0)]
    drawn = masks[0]
    assert drawn.shape == (64, 64) and not masks[1].any()
    assert drawn[20, 20:45].all()  # along the stroke
    assert not drawn[40:, :].any() and not drawn[:, :10].any()  # nowhere near it
