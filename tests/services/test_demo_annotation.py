"""The demo's regions studies: synthetic CLE frames imported with their truth masks, a closed study whose drawings
are SIMULATED (marked so everywhere) and usable by the agreement command, and an open study for the demo readers
whose second arm starts from the MLCAM-LICI model's map; built once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.data.synth_cle import make_cle_frames
from db import repo
from db.models import Annotation, Read, Specimen
from db.session import read_scope
from services import studies
from services.cli import main as cli
from services.demo import ensure_demo_accounts
from services.demo_annotation import (
    DEMO_ANNOTATION_STUDY,
    SIMULATED_ANNOTATION_STUDY,
    SIMULATED_ANNOTATORS,
    annotation_done,
    ensure_demo_annotation,
    simulate_drawing,
)
from services.study_ai import missing_ai
from tests.conftest import copy_workspace

N_FRAMES, SIZE = 8, 64


@pytest.fixture
def demo_frames(frames_workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the frames workspace (its tiny MLCAM-LICI model) with the demo accounts."""
    root = tmp_path / "ws"
    copy_workspace(frames_workspace[0], root)
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    ensure_demo_accounts()
    return root


def _study(title: str) -> studies.StudyInfo:
    with read_scope() as s:
        return next(x for x in studies.list_studies(s) if x.title == title)


def test_a_simulated_annotator_draws_the_truth_with_its_habits() -> None:
    frame = next(f for f in make_cle_frames(6, 96, seed=2) if f.label == 1)
    truth = frame.intermediate >= 128
    rng = np.random.default_rng(0)
    careful, generous, tight = (
        simulate_drawing(frame.intermediate, frame.restrictive, a, rng) for a in SIMULATED_ANNOTATORS
    )
    assert generous["intermediate"].sum() > careful["intermediate"].sum() > tight["intermediate"].sum() > 0
    assert (careful["intermediate"] == truth).mean() > 0.99  # no outline change, no region missed here
    assert not (careful["restrictive"] & ~careful["intermediate"]).any()  # nuclei only inside a drawn region


def test_the_demo_regions_studies_are_built_once_and_the_simulated_one_feeds_the_agreement_command(
    demo_frames: Path, tmp_path: Path
) -> None:
    ensure_demo_annotation("tiny-MLCAM", n_frames=N_FRAMES, size=SIZE, log=lambda _: None)
    assert annotation_done()
    simulated = _study(SIMULATED_ANNOTATION_STUDY)
    assert simulated.simulated and simulated.status == "closed" and "SIMULATED" in simulated.description
    assert simulated.question == "regions" and simulated.layers == ("intermediate", "restrictive")
    assert simulated.n_cases == N_FRAMES and len(simulated.reader_ids) == len(SIMULATED_ANNOTATORS)
    with read_scope() as s:
        sources = set(s.scalars(select(Read.source).where(Read.study_id == simulated.id)))
        drawn = s.scalar(select(func.count()).select_from(Annotation).where(Annotation.study_id == simulated.id))
        frames = s.scalar(select(func.count()).select_from(Specimen).where(Specimen.code.like("CLE-demo-%")))
    assert sources == {"simulated"} and drawn == N_FRAMES * len(SIMULATED_ANNOTATORS) and frames == N_FRAMES
    table = studies.latest_annotations(simulated.id)
    assert (table["empty"] == (table["intermediate_pixels"] == 0)).all()
    opened = _study(DEMO_ANNOTATION_STUDY)
    assert opened.status == "open" and not opened.simulated and opened.question == "regions"
    assert [a.starts_from_ai for a in opened.arms] == [False, True] and opened.arms[1].start_threshold == 0.2
    assert opened.arms[1].heatmap_method == "mlcam-lici" and missing_ai(opened.id) == []
    with read_scope() as s:
        invited = {u.username for u in repo.list_users(s) if u.id in opened.reader_ids}
    assert invited == {"reader", "reader2", "reader3"}
    out = tmp_path / "masks"
    assert cli(["studies", "export-masks", str(simulated.id), "--out", str(out)]) == 0
    assert cli(["agreement", "--masks", str(out), "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["pairwise"]) == 3 and all(0.0 < pair["dice"] <= 1.0 for pair in report["pairwise"])
    assert {r["reader"] for r in report["readers"]} == {a.username for a in SIMULATED_ANNOTATORS}
    before = drawn
    ensure_demo_annotation("tiny-MLCAM", n_frames=N_FRAMES, size=SIZE, log=lambda _: None)
    with read_scope() as s:
        mine = select(func.count()).select_from(Annotation).where(Annotation.study_id == simulated.id)
        assert s.scalar(mine) == before
        assert len([x for x in studies.list_studies(s) if "(demo)" in x.title and x.question == "regions"]) == 2
