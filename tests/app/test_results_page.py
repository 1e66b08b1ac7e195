"""The Results page (PI) and the results service on the shared trained workspace: a finished study with three
readers, the CNN's scores computed on the study images, Table 1, Fig. 2 and MRMC. (The page's CSV upload runs
the same ``core.stats.report`` functions tested in tests/core/test_report.py; AppTest cannot upload files.)"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.stats.report import jsonable
from db import repo
from db.models import ArmCase, Specimen, SpecimenImage, StudyCase
from db.session import init_db, session_scope
from services import results, studies
from services.cli import main
from services.studies import ArmSpec
from tests.conftest import reader_study

METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = str(ROOT / "pages" / "results.py")


@pytest.fixture
def finished_study(use_trained):
    """Every labelled specimen of the trained workspace, FL and WL arms, three readers who answered everything."""
    init_db()
    tag = uuid.uuid4().hex[:8]
    rng = np.random.default_rng(7)
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
        readers = [repo.create_user(s, f"rr{i}-{tag}", "pw-reader-1", "reader").id for i in range(3)]
        cases = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("train", "val", "test"))
        truth = dict(zip(cases["specimen_id"], cases["truth"], strict=True))
        study = studies.create_study(
            s, title=f"Finished {tag}", task="tumor", specimen_ids=[int(i) for i in cases["specimen_id"]],
            arms=(ArmSpec("FL", "FL"), ArmSpec("WL", "WL")), reader_ids=readers, created_by=pi,
        )  # fmt: skip
        specimen_of = dict(
            s.execute(
                select(ArmCase.token, StudyCase.specimen_id)
                .join(StudyCase, StudyCase.id == ArmCase.case_id)
                .where(StudyCase.study_id == study.id)
            ).all()
        )
    for reader in readers:
        for _ in range(2 * study.n_cases):
            with session_scope() as s:
                case = studies.reader_state(s, study.id, reader).case
            right = rng.random() < 0.8
            positive = truth[specimen_of[case.token]] == 1
            label = int(positive) if right else int(not positive)
            studies.record_read(
                study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=label,
                rating=int(rng.integers(1, 6)),
            )  # fmt: skip
    return study, pi


def test_the_results_of_a_finished_study(finished_study):
    study, _ = finished_study
    out = results.study_results(study.id, bootstrap=200, permutations=500)
    assert out.notes == [] and set(out.arms) == {"FL", "WL"}
    fl = out.arms["FL"]
    assert fl["model"] == "tiny-FL" and fl["threshold"]["policy"] != "fixed"  # the registered, validated threshold
    assert len(fl["raters"]) == 5 and {"model", "readers_mean"} <= set(fl["raters"])
    assert fl["n_cases"] == study.n_cases and "model_vs_readers" in fl
    band = fl["roc_band"]
    assert (band["low"] <= band["tpr"] + 1e-9).all() and (band["tpr"] <= band["high"] + 1e-9).all()
    assert band["tpr"].iloc[-1] == 1.0 and band["tpr"].is_monotonic_increasing
    assert out.mrmc is not None and set(out.mrmc["mean_auc"]) == {"FL", "WL"}


def test_export_then_analyze_reproduces_the_results_page(finished_study, tmp_path, capsys):
    """Issue 13, item 3: the study's reads export and its model scores per arm, fed to ``python -m core analyze``
    with the page's threshold, bootstrap, permutations and seed, give the page's Table 1 to the last digit."""
    study, _ = finished_study
    settings = ["--bootstrap", "200", "--permutations", "300", "--seed", "5"]
    page = results.study_results(study.id, bootstrap=200, permutations=300, seed=5)
    reads = tmp_path / "reads.csv"
    for arm in ("FL", "WL"):
        predictions = tmp_path / f"P-{arm}.csv"
        export = ["studies", "export", str(study.id), "--out", str(reads), "--predictions", str(predictions)]
        assert main([*export, "--arm", arm]) == 0
        threshold = re.search(r"--threshold (\S+)", capsys.readouterr().out).group(1)
        assert float(threshold) == page.arms[arm]["threshold"]["value"]  # the model's registered threshold
        out = tmp_path / f"report-{arm}.json"
        analyze = ["analyze", "--predictions", str(predictions), "--reads", str(reads), "--out", str(out), *settings]
        assert main([*analyze, "--arm", arm, "--threshold", threshold]) == 0
        report = json.loads(out.read_text())
        expected = jsonable(page.arms[arm])
        assert set(report["raters"]) == {"model", "readers_mean", *page.arms[arm]["inputs"].reads["reader_id"]}
        for rater, figures in expected["raters"].items():  # every rater's estimates and CIs (AUC where it has one)
            shown = [m for m in (*METRICS, "auc") if m in figures]
            assert {m: report["raters"][rater].get(m) for m in shown} == {m: figures[m] for m in shown}, (arm, rater)
            assert "auc" in shown or rater == "readers_mean"
        assert report["comparisons"] == expected["comparisons"]
    # what the issue saw: the bare confidence, as the old export and analyze had it, is another (wrong) analysis
    bare = pd.read_csv(reads, dtype=str).drop(columns=["score", "rating_scale"])
    bare.to_csv(reads, index=False)
    assert main([*analyze, "--arm", "WL", "--threshold", threshold]) == 0
    wrong = json.loads(out.read_text())["raters"]
    assert any(wrong[r]["auc"] != expected["raters"][r]["auc"] for r in wrong if r not in ("model", "readers_mean"))
    assert main([*analyze, "--arm", "WL", "--threshold", threshold, "--rating-scale", "five"]) == 0
    assert json.loads(out.read_text())["raters"] == report["raters"]  # such a file with its scale named: right again


def test_the_results_cache_key_moves_only_with_this_studys_reads_and_images(use_trained):
    """Issue 13, item 3: an upload, a prediction on an image outside the study or another study's read leave the
    study's results cached; its own new read or a new prediction on its images do not."""
    study, _, readers = reader_study(1)
    other, _, other_readers = reader_study(1)

    def version():
        with session_scope() as s:
            return results.study_version(s, study.id)

    def answer(study_id, reader):
        with session_scope() as s:
            case = studies.reader_state(s, study_id, reader).case
        studies.record_read(
            study_id=study_id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=3
        )

    with session_scope() as s:
        model = repo.model_for(s, "tumor", "FL")
        outside = s.scalars(
            select(SpecimenImage.id).join(Specimen).where(Specimen.split == "train", SpecimenImage.modality == "FL")
        ).first()
        inside = s.scalars(
            select(SpecimenImage.id)
            .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
            .where(StudyCase.study_id == study.id)
        ).first()
    before = version()
    with session_scope() as s:
        upload = repo.add_upload(
            s, user_id=None, original_name="x.png", modality="FL", path="uploads/x.png", sha256="0" * 64, height=8,
            width=8,
        )  # fmt: skip
        repo.add_prediction(s, model_id=model.id, probability=0.5, threshold=0.5, upload_id=upload)
        repo.add_prediction(s, model_id=model.id, probability=0.5, threshold=0.5, image_id=outside)
    answer(other.id, other_readers[0])
    assert version() == before
    answer(study.id, readers[0])
    after_read = version()
    assert after_read != before
    with session_scope() as s:
        repo.add_prediction(s, model_id=model.id, probability=0.5, threshold=0.5, image_id=inside)
    assert version() != after_read


def _open_study(finished_study) -> AppTest:
    """The Results page as the PI, with the finished study chosen."""
    study, pi = finished_study
    at = AppTest.from_file(RESULTS, default_timeout=120)
    at.session_state["auth_user_id"] = pi
    at.run()
    at.selectbox(key="results_study").set_value(study.id).run()
    assert not at.exception, at.exception
    return at


def test_the_results_page_shows_figure_tables_and_mrmc(finished_study):
    at = _open_study(finished_study)
    assert [t.label for t in at.tabs] == ["Arm FL", "Arm WL"]
    sent = "\n".join(str(e.proto) for e in at.get("plotly_chart"))
    assert "CNN, AUC" in sent and "CNN at threshold" in sent and "95 % band" in sent
    assert "rr0-" in sent and re.search(r"readers\\*' mean", sent)
    assert any("MRMC ROC analysis" in h.value for h in at.subheader)
    assert len(at.dataframe) >= 8  # per arm: Table 1, comparisons, errors, cases; plus MRMC tables
    commands = [c.value for c in at.code]  # per arm: how export -> analyze gives this Table 1
    assert len(commands) == 2 and all(re.search(r"--arm (FL|WL) --threshold 0\.\d+ --bootstrap", c) for c in commands)


def test_the_results_page_refuses_readers(finished_study):
    with session_scope() as s:
        reader = repo.create_user(s, f"r-{uuid.uuid4().hex[:6]}", "pw-reader-1", "reader").id
    at = AppTest.from_file(RESULTS, default_timeout=60)
    at.session_state["auth_user_id"] = reader
    at.run()
    assert [e.value for e in at.error] == ["This page is not available to the reader role."]


def test_the_roc_band_is_the_pointwise_percentile_of_resampled_step_curves():
    from core.stats.compare import bootstrap_counts, bootstrap_indices

    rng = np.random.default_rng(1)
    truth = (rng.random(150) < 0.5).astype(int)
    scores = np.round(np.clip(0.5 + (truth - 0.5) * 0.4 + rng.normal(0, 0.25, 150), 0, 1), 1)  # many ties
    band = results.roc_band(truth, scores, resamples=80, seed=3)
    weights = bootstrap_counts(bootstrap_indices(truth, 80, 3), truth.size)
    curves = []
    for w in weights:  # one resample at a time: its ROC step function read at each grid FPR
        thresholds = np.unique(scores)[::-1]
        tpr = np.r_[0, [(w * truth * (scores >= t)).sum() / (w * truth).sum() for t in thresholds]]
        fpr = np.r_[0, [(w * (1 - truth) * (scores >= t)).sum() / (w * (1 - truth)).sum() for t in thresholds]]
        curves.append([tpr[fpr <= g + 1e-12].max() for g in band["fpr"]])
    np.testing.assert_allclose(band["low"], np.quantile(curves, 0.025, axis=0), atol=1e-6)
    np.testing.assert_allclose(band["high"], np.quantile(curves, 0.975, axis=0), atol=1e-6)


def test_the_cross_arm_rows_put_the_fl_cnn_against_the_wl_arm(finished_study):
    """Seed 003's Table 1 cross-arm rows: on the cases both arms share, the FL-CNN (at the FL arm's threshold)
    against the WL arm's readers and the WL-CNN. The same bootstrap resamples as the arms' own rows (same cases,
    truth and seed), so each rater's estimates and CIs are those of its own arm."""
    study, _ = finished_study
    out = results.study_results(study.id, bootstrap=200, permutations=300, seed=2)
    cross = out.cross
    assert cross["arms"] == {"FL": "FL", "WL": "WL"} and cross["models"] == {"FL": "tiny-FL", "WL": "tiny-WL"}
    assert cross["n_cases"] == study.n_cases
    fl, wl = out.arms["FL"], out.arms["WL"]
    vs_readers, vs_model = cross["vs_readers"], cross["vs_model"]
    assert vs_readers["threshold"]["value"] == vs_model["threshold"]["value"] == fl["threshold"]["value"]
    wl_readers = set(wl["inputs"].reads["reader_id"])
    assert set(vs_readers["raters"]) == {"model", "readers_mean", *wl_readers}
    for rater in (*wl_readers, "readers_mean"):
        assert vs_readers["raters"][rater] == wl["raters"][rater]  # the WL arm's readers, as in their own arm
    assert set(vs_model["raters"]) == {"model", "WL-CNN"}
    for metric in (*METRICS, "auc"):
        assert vs_readers["raters"]["model"][metric] == fl["raters"]["model"][metric]  # the FL-CNN of its arm
        assert vs_model["raters"]["WL-CNN"][metric] == wl["raters"]["model"][metric]  # the WL-CNN of its arm
    accuracy = next(c for c in vs_model["comparisons"] if c["metric"] == "accuracy")
    expected = fl["raters"]["model"]["accuracy"]["estimate"] - wl["raters"]["model"]["accuracy"]["estimate"]
    assert accuracy["difference"] == pytest.approx(expected) and 0 < accuracy["p_value"] <= 1
    assert {c["b"] for c in vs_model["comparisons"]} == {"WL-CNN"}
    assert {c["method"] for c in vs_model["comparisons"] if c["metric"] == "auc"} == {"DeLong"}
    assert {c["b"] for c in vs_readers["comparisons"]} == {"readers_mean", *wl_readers}


def test_a_study_without_both_arms_has_no_cross_arm_rows(use_trained):
    study, _, _ = reader_study(1, arms=(ArmSpec("FL only", "FL"),))
    out = results.study_results(study.id, bootstrap=100, permutations=100)
    assert out.cross is None


def test_the_results_page_shows_the_cross_arm_rows(finished_study):
    at = _open_study(finished_study)
    assert any("FL-CNN against the WL arm" in h.value for h in at.subheader)
    titles = [m.value for m in at.markdown]
    assert "**FL-CNN vs readers of the WL arm**" in titles and "**FL-CNN vs WL-CNN**" in titles
    tables = [t.value for t in at.dataframe]
    model_table = next(t for t in tables if "rater" in t.columns and "WL-CNN" in set(t["rater"]))
    assert list(model_table["rater"]) == ["FL-CNN", "WL-CNN"]
    compared = next(t for t in tables if "FL-CNN vs" in t.columns and "WL-CNN" in set(t["FL-CNN vs"]))
    assert set(compared["metric"]) == {*METRICS, "auc"}
