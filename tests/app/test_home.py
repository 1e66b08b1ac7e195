"""Home, the dashboard of each role, with Streamlit's AppTest, and the queries behind it (services.dashboard).

A private copy of the trained workspace gets a two-arm study (the second arm after a one-day wash-out) with one
reader through arm 1 and another two cases in, three diagnoses, a model scored only on validation data and job rows
written straight into the jobs table (no cluster involved).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import skimage.data
from sqlalchemy import delete, select, update
from streamlit.testing.v1 import AppTest

from core.settings import pointing_at
from core.text import md_escape
from core.train import DECISIONS
from db import repo
from db.models import Job, Patient, Specimen, StudyCase, utcnow
from db.session import init_db, read_scope, session_scope
from services import dashboard, studies
from services.diagnose import diagnose_files, load_predictor
from services.studies import ArmSpec
from tests.conftest import copy_workspace

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")
HOSTILE = "**x** <script>alert(1)</script> [y](http://host/a)"
TITLE = "Trial *one* <b>FL</b> :red[z]"
FILE = "**scan** <img src=x>.jpg"
JOB_TITLE = "Train **tiny** <model>"


@dataclass(frozen=True)
class Seeded:
    root: Path
    pi: int
    clinician: int
    fast: int  # through arm 1; arm 2 waits for its wash-out
    slow: int  # two cases into arm 1 (display name: HOSTILE)
    idle: int  # a reader invited to nothing
    study_id: int
    n_cases: int
    codes: tuple[str, ...]  # the study's specimen and patient codes


def _answer(study_id: int, reader_id: int, arm_number: int, cases: int) -> None:
    """``cases`` answers of this reader in this arm, each on the case the protocol serves."""
    for i in range(cases):
        with read_scope() as s:
            state = studies.reader_state(s, study_id, reader_id)
        assert state.kind == "case" and state.case.arm_number == arm_number
        studies.record_read(
            study_id=study_id,
            reader_id=reader_id,
            arm_id=state.case.arm_id,
            token=state.case.token,
            label=i % 2,
            rating=3,
        )


@pytest.fixture(scope="module")
def seeded(trained_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("home") / "ws"
    copy_workspace(trained_workspace, root)
    with pointing_at(root):
        tag = uuid.uuid4().hex[:6]
        with session_scope() as s:
            s.execute(delete(Job))  # jobs earlier tests ran on the shared trained workspace: this test seeds its own
            pi = repo.create_user(s, f"pi-{tag}", "pw-home-1", "pi", display_name="Dr Pia").id
            clinician = repo.create_user(s, f"cl-{tag}", "pw-home-1", "clinician", display_name=HOSTILE).id
            fast = repo.create_user(s, f"fay-{tag}", "pw-home-1", "reader", display_name="Fay Fastreader").id
            slow = repo.create_user(s, f"sam-{tag}", "pw-home-1", "reader", display_name=HOSTILE).id
            idle = repo.create_user(s, f"ida-{tag}", "pw-home-1", "reader", display_name="Ida Idle").id
            cases = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
            study = studies.create_study(
                s,
                title=TITLE,
                task="tumor",
                specimen_ids=[int(i) for i in cases["specimen_id"]],
                arms=(ArmSpec("FL first", "FL"), ArmSpec("WL later", "WL", washout_days=1)),
                reader_ids=[fast, slow],
                created_by=pi,
            )
            codes = s.execute(
                select(Specimen.code, Patient.code)
                .join(Patient, Patient.id == Specimen.patient_id)
                .join(StudyCase, StudyCase.specimen_id == Specimen.id)
                .where(StudyCase.study_id == study.id)
            ).all()
            wl = repo.find_model(s, "tiny-WL")
            repo.register_model(
                s,
                name="val-only",
                architecture=wl.architecture,
                task=wl.task,
                modality="WL",
                image_size=wl.image_size,
                checkpoint_path=wl.checkpoint_path,
                checkpoint_sha256=wl.checkpoint_sha256,
                threshold=0.42,
                threshold_policy="youden",
                metrics={"val_auc": 0.8125, "val_n": 20, "val_sensitivity": 0.9, "val_specificity": 0.7},
                config=wl.config,
            )
            now = utcnow()
            s.add_all(
                [
                    Job(kind="train", title=JOB_TITLE, state="running", progress=0.4, message="epoch 2/5",
                        submitted_by=pi, started_at=now),
                    Job(kind="study_ai", title="Study AI outputs", state="queued", submitted_by=pi),
                    Job(kind="train", title="Old run", state="succeeded", progress=1.0, submitted_by=pi,
                        started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=1)),
                    Job(kind="mosaic", title="Broken mosaic", state="failed", progress=0.1, submitted_by=clinician,
                        started_at=now - timedelta(minutes=30), finished_at=now - timedelta(minutes=29),
                        error="out of memory"),
                ]
            )  # fmt: skip
        predictor = load_predictor(wl)
        retina = os.path.join(skimage.data.data_dir, "retina.jpg")
        diagnose_files(predictor, wl, [(FILE, retina), ("second.jpg", retina)], user_id=clinician)
        diagnose_files(predictor, wl, [("pi-own.jpg", retina)], user_id=pi)
        _answer(study.id, fast, 1, study.n_cases)
        _answer(study.id, slow, 1, 2)
        yield Seeded(
            root, pi, clinician, fast, slow, idle, study.id, study.n_cases, tuple(c for pair in codes for c in pair)
        )


@pytest.fixture
def home(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> Seeded:
    monkeypatch.setenv("IOAI_WORKSPACE", str(seeded.root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{seeded.root / 'study.db'}")
    return seeded


def _home(user_id: int) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["auth_user_id"] = user_id
    at.run()
    assert not at.exception, at.exception
    return at


def _frame(at: AppTest, column: str) -> pd.DataFrame:
    """The one data frame on the page with this column."""
    (frame,) = [d.value for d in at.dataframe if column in d.value.columns]
    return frame


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def _everything_sent(at: AppTest) -> str:
    """Every element the page sent to the browser, serialised, data frames decoded."""
    parts = [str(node.proto) for node in _walk(at._tree) if getattr(node, "proto", None) is not None]
    parts += [d.value.to_csv() for d in at.dataframe]
    return "\n".join(parts)


def _rendered(at: AppTest) -> list[str]:
    """What Streamlit renders as markdown: markdown, captions, alerts, headings and progress texts."""
    texts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "title", "subheader")
             for e in getattr(at, kind)]  # fmt: skip
    return texts + [p.text for p in at.progress]


def test_pi_sees_study_progress_jobs_diagnoses_and_models(home: Seeded):
    at = _home(home.pi)
    n = home.n_cases
    progress = _frame(at, "Arm 1: FL first").set_index("reader")
    assert progress.loc["Fay Fastreader", "Arm 1: FL first"] == f"{n} / {n}"
    assert progress.loc["Fay Fastreader", "Arm 2: WL later"] == f"0 / {n}"
    assert progress.loc[HOSTILE, "Arm 1: FL first"] == f"2 / {n}"
    assert any(md_escape(TITLE) in m.value and f"{n} cases" in m.value for m in at.markdown)
    assert any(p.text == f"{(n + 2) / (4 * n):.0%} of all reads done" for p in at.progress)

    (running,) = [p for p in at.progress if md_escape("epoch 2/5") in p.text]
    assert running.value == 40 and md_escape(JOB_TITLE) in running.text and "running" in running.text
    assert any(md_escape("Study AI outputs") in p.text and "queued" in p.text for p in at.progress)
    finished = _frame(at, "ended (UTC)")
    assert dict(zip(finished["job"], finished["state"], strict=True)) == {
        "Broken mosaic": "failed",
        "Old run": "succeeded",
    }
    links = [link.value for link in at.page_link]
    assert ("All jobs" in links) == (ROOT / "pages" / "jobs.py").is_file()

    diagnoses = _frame(at, "probability")
    assert list(diagnoses["image"][:3]) == ["pi-own.jpg", "second.jpg", FILE]
    assert list(diagnoses["by"][:3]) == ["Dr Pia", HOSTILE, HOSTILE]
    assert set(diagnoses["decision"]) <= set(DECISIONS["tumor"])

    models = _frame(at, "AUC").set_index("name")
    with read_scope() as s:
        fl = repo.find_model(s, "tiny-FL")
    assert models.loc["tiny-FL", "scored on"] == f"test ({fl.metrics['test_n']})"
    assert models.loc["tiny-FL", "AUC"] == pytest.approx(round(fl.metrics["test_auc"], 3))
    assert models.loc["tiny-FL", "threshold"] == pytest.approx(round(fl.threshold, 3))
    assert models.loc["val-only", "scored on"] == "val (20)"
    assert list(models.loc["val-only", ["AUC", "sensitivity", "specificity", "threshold"]]) == pytest.approx(
        [0.812, 0.9, 0.7, 0.42], abs=1e-3
    )
    assert {"Diagnose an image", "Models"} <= set(links)


def test_clinician_sees_only_their_own_diagnoses_newest_first(home: Seeded):
    at = _home(home.clinician)
    diagnoses = _frame(at, "probability")
    assert list(diagnoses["image"]) == ["second.jpg", FILE]
    assert "by" not in diagnoses.columns
    assert "Diagnose an image" in [link.value for link in at.page_link]
    sent = _everything_sent(at)
    assert "pi-own.jpg" not in sent and "epoch" not in sent and "Fay Fastreader" not in sent


def test_reader_sees_own_progress_and_nothing_about_truth_ai_or_other_readers(home: Seeded):
    at = _home(home.slow)
    arms = _frame(at, "answered")
    n = home.n_cases
    assert list(arms["arm"]) == ["Arm 1: FL first", "Arm 2: WL later"]
    assert list(arms["answered"]) == [f"2 / {n}", f"0 / {n}"]
    assert list(arms["status"]) == ["open", "not yet"]
    assert any(md_escape(TITLE) in m.value for m in at.markdown)
    assert "Continue reading" in [link.value for link in at.page_link]

    sent = _everything_sent(at)
    with read_scope() as s:
        models = [m.name for m in repo.list_models(s)]
    forbidden = ["Fay Fastreader", "fay-", *models, "AUC", "probability", "sensitivity", "epoch", "Study AI",
                 "second.jpg", *DECISIONS["tumor"], *home.codes]  # fmt: skip
    assert [word for word in forbidden if word in sent] == []

    waiting = _frame(_home(home.fast), "answered")
    assert list(waiting["answered"]) == [f"{n} / {n}", f"0 / {n}"]
    assert waiting["status"][0] == "done"
    assert waiting["status"][1].startswith("opens ") and waiting["status"][1].endswith(" UTC")


def test_user_text_is_shown_literally(home: Seeded):
    for user_id in (home.pi, home.clinician, home.slow):
        at = _home(user_id)
        live = [text for text in _rendered(at) if any(s in text for s in (HOSTILE, TITLE, FILE, JOB_TITLE))]
        assert live == [], f"user text rendered as markdown: {live}"
        if user_id != home.pi:
            assert any(m.value.startswith(f"Signed in as **{md_escape(HOSTILE)}**") for m in at.markdown)
    at = _home(home.pi)
    assert HOSTILE in list(_frame(at, "Arm 1: FL first")["reader"])  # data frames are plain text
    assert FILE in list(_frame(at, "probability")["image"])
    assert any(md_escape(TITLE) in m.value for m in at.markdown)
    assert any(md_escape(JOB_TITLE) in p.text for p in at.progress)


def test_an_idle_reader_is_told_what_happens_next(home: Seeded):
    at = _home(home.idle)
    assert any("No open reader study is assigned to you" in i.value for i in at.info)
    assert not at.dataframe


def test_the_demo_banner_shows_while_the_demo_builds_and_empty_states_say_what_to_do(workspace: Path):
    init_db()
    with session_scope() as s:
        ids = {role: repo.create_user(s, role, f"pw-{role}-1", role).id for role in ("pi", "clinician", "reader")}
        s.add_all(
            [
                Job(kind="demo", title="Demo workspace: cohort", state="running", progress=0.25,
                    message="importing 3/12 specimens", started_at=utcnow()),
                Job(kind="demo", title="Demo workspace: models", state="queued"),
                Job(kind="train", title="Somebody's training", state="running", progress=0.5, message="epoch 1/2"),
            ]
        )  # fmt: skip
    empty = {
        "pi": ["No open reader study", "No diagnoses yet", "No models yet: train one on the Models page."],
        "clinician": ["No diagnoses yet: upload an image on the Diagnose page."],
        "reader": ["No open reader study is assigned to you"],
    }
    for role, user_id in ids.items():
        at = _home(user_id)
        assert any("The demo workspace is being built" in i.value for i in at.info), role
        bars = {p.text: p.value for p in at.progress}
        assert bars[md_escape("Demo workspace: cohort · running · importing 3/12 specimens")] == 25
        assert bars[md_escape("Demo workspace: models · queued")] == 0
        assert (md_escape("Somebody's training · running · epoch 1/2") in bars) == (role == "pi")
        for text in empty[role]:
            assert any(text in i.value for i in at.info), (role, text)
        assert any("Research software" in c.value for c in at.caption)

    with session_scope() as s:
        s.execute(update(Job).where(Job.kind == "demo").values(state="succeeded", progress=1.0, finished_at=utcnow()))
    at = _home(ids["reader"])
    assert not any("demo workspace" in i.value for i in at.info)
    assert not at.progress


def test_dashboard_queries(home: Seeded):
    now = utcnow()
    with read_scope() as s:  # every query is a read: a write in one would fail here
        (progress,) = [p for p in dashboard.study_progress(s) if p.id == home.study_id]
        assert progress.title == TITLE and progress.arms == ("FL first", "WL later")
        assert progress.n_cases == home.n_cases
        assert {r.name: r.answered for r in progress.readers} == {
            "Fay Fastreader": (home.n_cases, 0),
            HOSTILE: (2, 0),
        }
        assert progress.done == pytest.approx((home.n_cases + 2) / (4 * home.n_cases))

        (slow,) = dashboard.reader_progress(s, home.slow)
        assert [(a.name, a.answered, a.total, a.state) for a in slow.arms] == [
            ("FL first", 2, home.n_cases, "open"),
            ("WL later", 0, home.n_cases, "later"),
        ]
        (fast,) = dashboard.reader_progress(s, home.fast, now=now)
        assert [a.state for a in fast.arms] == ["done", "washout"]
        assert now < fast.arms[1].opens_at <= now + timedelta(days=1)
        (later,) = dashboard.reader_progress(s, home.fast, now=now + timedelta(days=2))
        assert [a.state for a in later.arms] == ["done", "open"]
        assert dashboard.reader_progress(s, home.idle) == []

        mine = dashboard.recent_diagnoses(s, user_id=home.clinician)
        assert [d.image for d in mine] == ["second.jpg", FILE] and {d.user for d in mine} == {HOSTILE}
        assert all(d.decision == DECISIONS["tumor"][int(d.probability >= d.threshold)] for d in mine)
        assert [d.image for d in dashboard.recent_diagnoses(s, limit=1)] == ["pi-own.jpg"]

        figures = {m.name: m for m in dashboard.model_figures(s)}
        fl = repo.find_model(s, "tiny-FL")
        assert figures["tiny-FL"].split == "test" and figures["tiny-FL"].auc == pytest.approx(fl.metrics["test_auc"])
        assert figures["tiny-FL"].sensitivity == pytest.approx(fl.metrics["test_sensitivity"])
        assert (figures["val-only"].split, figures["val-only"].n, figures["val-only"].auc) == ("val", 20, 0.8125)

    studies.set_status(home.study_id, "closed", user_id=home.pi)
    try:
        with read_scope() as s:
            assert home.study_id not in [p.id for p in dashboard.study_progress(s)]
            assert dashboard.reader_progress(s, home.slow) == []
    finally:
        studies.set_status(home.study_id, "open", user_id=home.pi)
