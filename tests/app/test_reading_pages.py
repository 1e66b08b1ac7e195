"""The Read page (reader) and the Studies page (PI) with Streamlit's AppTest, on the shared trained workspace.

Each test makes its own accounts and study (unique names), so tests do not see each other's reads.
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.models import ArmCase, AuditEvent, Read, Specimen, SpecimenImage, StudyCase
from db.session import read_scope, session_scope
from services import studies
from services.studies import ArmSpec
from tests.conftest import reader_study

ROOT = Path(__file__).resolve().parents[2]
READ = str(ROOT / "pages" / "read.py")
STUDIES = str(ROOT / "pages" / "studies.py")


def _page(path, user_id, query=None):
    at = AppTest.from_file(path, default_timeout=60)
    at.session_state["auth_user_id"] = user_id
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def _progress(at):
    text = " ".join(m.value for m in at.markdown)
    found = re.search(r"case \*\*(\d+)\*\* of \*\*(\d+)\*\*", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _answer(at, label, rating):
    token = _served_token(at)
    at.radio(key=next(r.key for r in at.radio if r.key.startswith("read_label_"))).set_value(label)
    at.radio(key=next(r.key for r in at.radio if r.key.startswith("read_rating_"))).set_value(rating)
    next(b for b in at.button if b.label == "Submit answer").click()
    return token, at.run()


def _served_token(at):
    """The token of the case the page is showing, read from the server side of the session (the page never sends
    it to the browser: see ``test_the_page_holds_nothing_that_tells_the_truth_or_the_specimen``)."""
    if not any(r.key.startswith("read_label_") for r in at.radio):
        return None
    revising = at.session_state.get("read_revise")
    return revising[1] if revising else list(at.session_state["read_shown"])[-1][1]


def _case_of(token):
    """The study case behind an arm's token."""
    with read_scope() as s:
        return s.scalar(select(StudyCase).join(ArmCase, ArmCase.case_id == StudyCase.id).where(ArmCase.token == token))


def _everything_sent(at) -> str:
    """Every element the page sent to the browser, serialised (what a reader's browser receives)."""
    text = "\n".join(str(node.proto) for node in _walk(at._tree) if hasattr(node, "proto"))
    return text.replace("\\\\u002f", "/")  # Plotly's JSON escapes "/"


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def test_a_reader_answers_case_after_case_and_resumes_after_a_new_session(use_trained):
    study, _, (reader, _) = reader_study()
    at = _page(READ, reader)
    assert not at.exception and _progress(at) == (1, study.n_cases)
    first, at = _answer(at, 1, 4)
    assert not at.exception and _progress(at) == (2, study.n_cases)
    assert any("Answer saved" in s.value for s in at.success)
    second = _served_token(at)
    again = _page(READ, reader, {"study": str(study.id)})  # sign-out, refresh or restart: a new session
    assert _progress(again) == (2, study.n_cases) and _served_token(again) == second
    with session_scope() as s:
        (read,) = s.scalars(select(Read).where(Read.reader_id == reader)).all()
        token = s.scalar(select(ArmCase.token).where(ArmCase.case_id == read.case_id, ArmCase.arm_id == read.arm_id))
        assert (token, read.label, read.rating, read.version) == (first, 1, 4, 1)
        assert read.shown_at is not None and read.duration_s >= 0
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.user_id == reader)).all()
    assert actions.count("read_recorded") == 1 and actions.count("case_shown") >= 2


def test_an_incomplete_answer_is_refused_with_a_message_and_stores_nothing(use_trained):
    study, _, (reader, _) = reader_study()
    at = _page(READ, reader)
    next(b for b in at.button if b.label == "Submit answer").click()
    at.run()
    assert [e.value for e in at.error] == ["choose a diagnosis"] and _progress(at) == (1, study.n_cases)
    with session_scope() as s:
        assert s.scalars(select(Read).where(Read.reader_id == reader)).all() == []


def test_the_page_holds_nothing_that_tells_the_truth_or_the_specimen(use_trained):
    """Two cases with opposite truths give the same page apart from the pixels and the position; the case's token,
    specimen code, patient, stored file name and digest appear nowhere (element keys included), and the PNG has no
    metadata chunks."""
    study, _, (reader, _) = reader_study()
    with session_scope() as s:
        truth_of = dict(
            s.execute(
                select(ArmCase.token, repo.Label.tumor)
                .join(StudyCase, ArmCase.case_id == StudyCase.id)
                .join(repo.Label, repo.Label.specimen_id == StudyCase.specimen_id)
                .where(StudyCase.study_id == study.id)
            ).all()
        )
    snapshots = {}
    at = _page(READ, reader)
    for _ in range(study.n_cases):
        token = _served_token(at)
        fresh = _page(READ, reader)  # the page as a new session first shows it
        assert _served_token(fresh) == token
        snapshots.setdefault(truth_of[token], (token, _everything_sent(fresh), _progress(fresh)[0]))
        if len(snapshots) == 2:
            break
        _, at = _answer(at, 0, 3)
    assert set(snapshots) == {True, False}
    trees = []
    for token, sent, k in snapshots.values():
        with session_scope() as s:
            code, patient, path, sha = s.execute(
                select(Specimen.code, repo.Patient.code, SpecimenImage.path, SpecimenImage.sha256)
                .join(StudyCase, StudyCase.specimen_id == Specimen.id)
                .join(ArmCase, ArmCase.case_id == StudyCase.id)
                .join(repo.Patient, repo.Patient.id == Specimen.patient_id)
                .join(SpecimenImage, SpecimenImage.specimen_id == Specimen.id)
                .where(ArmCase.token == token, SpecimenImage.modality == "FL")
            ).one()
        for secret in (token, code, patient, path, sha, Path(path).name, "truth", "probability"):
            assert secret not in sent
        png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", sent).group(1))
        assert png.startswith(b"\x89PNG") and not any(c in png for c in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP"))
        tree = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "<png>", sent)
        tree = tree.replace(f"case **{k}** of", "case **k** of")
        tree = re.sub(rf"(read_[a-z]+)_{study.id}_1_{k}_0", r"\1_<k>", tree)  # keys say "case k" and nothing more
        tree = re.sub(r"\$\$ID-[0-9a-f]{32}-", "$$ID-", tree)  # widget ids hash their keys
        trees.append(re.sub(r"(?m)^value: \d+\n", "", tree))  # the progress bar (absent when 0)
    assert trees[0] == trees[1]


@pytest.mark.parametrize("where", ["url", "session"])
def test_a_study_not_assigned_is_refused_whether_typed_in_the_url_or_forced_into_session_state(use_trained, where):
    mine, _, (reader, _) = reader_study()
    other, _, _ = reader_study()
    at = AppTest.from_file(READ, default_timeout=60)
    at.session_state["auth_user_id"] = reader
    if where == "url":
        at.query_params["study"] = str(other.id)
    else:
        at.session_state["read_study"] = other.id
    at.run()
    assert not at.exception
    assert any("not assigned to you" in e.value for e in at.error)
    assert at.session_state["read_study"] == mine.id  # fell back to the reader's own (only) open study
    assert _progress(at) is not None and other.title not in _everything_sent(at)


def test_a_forged_correction_request_is_refused(use_trained):
    """Without corrections allowed, a (arm, token) pushed into session state never reopens a case."""
    study, _, (reader, other) = reader_study()
    at = _page(READ, other)
    theirs, _ = _answer(at, 1, 5)  # another reader's answered case
    at = AppTest.from_file(READ, default_timeout=60)
    at.session_state["auth_user_id"] = reader
    at.session_state["read_revise"] = (study.arms[0].id, theirs)
    at.run()
    assert not at.exception and _served_token(at) is not None and "Correcting" not in _everything_sent(at)


def test_corrections_where_allowed_keep_the_old_answer(use_trained):
    study, _, (reader, _) = reader_study(allow_revisions=True)
    at = _page(READ, reader)
    first, at = _answer(at, 1, 2)
    at.selectbox(key="read_revise_pick").set_value((study.arms[0].id, first))
    at.button(key="read_revise_open").click()
    at.run()
    assert _served_token(at) == first and any("Correcting your answer" in w.value for w in at.warning)
    label = f"read_label_{study.id}_1_1_1"  # study, arm 1, case 1 of this reader's order, a correction
    assert at.radio(key=label).value == 1  # the current answer, preset
    at.radio(key=label).set_value(0)
    next(b for b in at.button if b.label == "Save correction").click()
    at.run()
    assert any("version 2" in s.value for s in at.success) and _progress(at) == (2, study.n_cases)
    with session_scope() as s:
        history = s.execute(select(Read.version, Read.label).where(Read.reader_id == reader).order_by(Read.id))
        assert [tuple(r) for r in history] == [(1, 1), (2, 0)]


def test_training_cases_then_reading(use_trained):
    with session_scope() as s:
        pool = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("train",))
    study, _, (reader, _) = reader_study(training_specimen_ids=[int(i) for i in pool["specimen_id"][:2]])
    at = _page(READ, reader)
    assert "Truth:" in _everything_sent(at) and _progress(at) is None
    next(b for b in at.button if b.label.startswith("I have reviewed")).click()
    at.run()
    assert _progress(at) == (1, study.n_cases) and "Truth:" not in _everything_sent(at)


def test_a_closed_study_says_so(use_trained):
    study, pi, (reader, _) = reader_study()
    with session_scope() as s:
        studies.set_status(s, study.id, "closed", user_id=pi)
    at = _page(READ, reader)
    assert any("closed" in w.value for w in [*at.info, *at.warning]) and _progress(at) is None


def test_the_pi_creates_follows_and_closes_a_study(use_trained):
    _, pi, (reader, _) = reader_study()
    at = _page(STUDIES, pi)
    assert not at.exception
    title = f"Created on the page {uuid.uuid4().hex[:6]}"
    at.text_input(key="studies_title").input(title)
    at.multiselect(key="studies_readers").set_value([reader])
    at.button(key="studies_create").click()
    at.run()
    assert not at.exception and any("created with" in s.value for s in at.success)
    with session_scope() as s:
        study = next(x for x in studies.list_studies(s) if x.title == title)
    assert [a.name for a in study.arms] == ["FL", "WL"] and study.reader_ids == (reader,)
    assert any("0% of all reads done" in str(p.proto) for p in at.get("progress"))
    at.button(key=f"studies_status_{study.id}").click()
    at.run()
    with session_scope() as s:
        assert studies.get_study(s, study.id).status == "closed"
        assert "study_closed" in s.scalars(select(AuditEvent.action).where(AuditEvent.study_id == study.id)).all()


@pytest.mark.parametrize(("role", "page"), [("reader", STUDIES), ("clinician", STUDIES), ("pi", READ)])
def test_study_pages_refuse_other_roles(use_trained, role, page):
    _, pi, (reader, _) = reader_study()
    with session_scope() as s:
        clinician = repo.create_user(s, f"c-{uuid.uuid4().hex[:6]}", "pw-clin-12", "clinician").id
    at = _page(page, {"pi": pi, "reader": reader, "clinician": clinician}[role])
    assert [e.value for e in at.error] == [f"This page is not available to the {role} role."]
    assert not at.dataframe and not at.radio


def test_an_aided_arm_shows_the_models_output_computed_when_the_study_was_made(use_trained):
    from services.study_ai import missing_ai, prepare_study_ai

    with session_scope() as s:
        model = repo.find_model(s, "tiny-FL")
    arm = ArmSpec("FL + AI", "FL", model_id=model.id, show_probability=True, show_decision=True, heatmap_method="cam")
    study, _, (reader, _) = reader_study(arms=(ArmSpec("FL", "FL"), arm))
    assert len(missing_ai(study.id)) == study.n_cases  # only the aided arm needs outputs
    seen = []
    assert prepare_study_ai(study.id, progress=lambda done, total: seen.append((done, total))) == study.n_cases
    assert seen[-1] == (study.n_cases, study.n_cases) and missing_ai(study.id) == []
    at = _page(READ, reader)
    assert "AI output" not in _everything_sent(at)  # the unaided arm first
    for _ in range(study.n_cases):
        with session_scope() as s:  # one transaction per page run: a long one would keep seeing its first snapshot
            case = studies.reader_state(s, study.id, reader).case
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=0, rating=1
        )
    with read_scope() as s:
        case = studies.reader_state(s, study.id, reader).case
        prediction = s.scalar(
            select(repo.Prediction)
            .join(SpecimenImage, SpecimenImage.id == repo.Prediction.image_id)
            .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
            .where(StudyCase.id == _case_of(case.token).id, SpecimenImage.modality == "FL")
            .where(repo.Prediction.model_id == model.id)
        )
    at = _page(READ, reader)
    assert _progress(at) == (1, study.n_cases) and any(md_escape("FL + AI") in m.value for m in at.markdown)
    (info,) = [i.value for i in at.info if i.value.startswith("AI output")]
    assert f"**{prediction.probability:.2f}**" in info and ("**tumor**" in info or "**non-tumor**" in info)
    assert at.toggle(key="read_heatmap_on").value is True
    with_map = _everything_sent(at)
    at.toggle(key="read_heatmap_on").set_value(False).run()
    assert re.search(r"base64,([A-Za-z0-9+/=]+)", _everything_sent(at)).group(1) != re.search(
        r"base64,([A-Za-z0-9+/=]+)", with_map
    ).group(1)


def test_the_pi_edits_a_studys_title_and_allows_corrections(use_trained):
    study, pi, _ = reader_study()
    at = _page(STUDIES, pi)
    at.selectbox(key="studies_pick").set_value(study.id).run()
    at.text_input(key=f"studies_edit_title_{study.id}").input("Renamed on the page")
    at.checkbox(key=f"studies_edit_rev_{study.id}").check()
    at.button(key=f"studies_edit_save_{study.id}").click()
    at.run()
    assert not at.exception
    with session_scope() as s:
        changed = studies.get_study(s, study.id)
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.study_id == study.id)).all()
    assert (changed.title, changed.allow_revisions) == ("Renamed on the page", True) and "study_updated" in actions
