"""Two models of one task on the same specimens (Table 2 / Fig. 4 of seed 003): known answers on constructed scores,
the paired comparison of two tiny registered grade models, the refusals, and ``python -m core compare-models``."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
import pytest

from core.metrics.classification import auc, binary_metrics
from db import repo
from db.session import read_scope
from services import model_compare
from services.model_compare import CompareError, compare_models, compare_scores, comparison_figure, comparison_table
from services.model_compare_cli import main

TRUTH = np.r_[np.ones(30), np.zeros(30)].astype(int)


def test_a_better_model_gets_small_p_values_and_the_worse_one_large_differences():
    rng = np.random.default_rng(0)
    good = 0.6 * TRUTH + 0.5 * rng.random(60)  # separates the classes perfectly at 0.5
    noise = rng.random(60)
    report = compare_scores(TRUTH, good, noise, 0.5, 0.5, resamples=300, permutations=2000)
    metrics = report["metrics"]
    assert metrics["auc"]["a"]["estimate"] == 1.0 and metrics["accuracy"]["a"]["estimate"] == 1.0
    assert metrics["auc"]["b"]["estimate"] == pytest.approx(auc(TRUTH, noise))
    expected = binary_metrics(TRUTH, noise, 0.5)
    for metric in ("accuracy", "sensitivity", "specificity", "f1"):
        assert metrics[metric]["b"]["estimate"] == pytest.approx(expected[metric])
        assert metrics[metric]["difference"] == pytest.approx(1.0 - expected[metric])
    for metric in model_compare.SHOWN:
        entry = metrics[metric]
        assert entry["p_value"] < 0.01, metric
        low, high = entry["ci"]
        assert 0 < low <= entry["difference"] <= high, metric  # the interval of a real difference excludes 0
        assert entry["b"]["ci"][0] <= entry["b"]["estimate"] <= entry["b"]["ci"][1]
    assert metrics["auc"]["delong_p"] < 0.01
    assert metrics["sensitivity"]["mcnemar_p"] < 0.05 and metrics["specificity"]["mcnemar_p"] < 0.05
    assert report["counts"]["a"] == {"tp": 30, "fp": 0, "tn": 30, "fn": 0}


def test_identical_models_differ_by_nothing_with_p_one():
    scores = np.random.default_rng(1).random(60) * 0.5 + 0.3 * TRUTH
    report = compare_scores(TRUTH, scores, scores.copy(), 0.5, 0.5, resamples=200, permutations=500)
    for metric in model_compare.SHOWN:
        entry = report["metrics"][metric]
        assert entry["difference"] == 0.0 and entry["ci"] == [0.0, 0.0]
        assert entry["p_value"] == 1.0
        assert entry["a"] == entry["b"]
    assert report["metrics"]["auc"]["delong_p"] == 1.0
    assert report["metrics"]["sensitivity"]["mcnemar_p"] == 1.0


def test_each_model_decides_at_its_own_threshold():
    scores = np.linspace(0.0, 1.0, 60)
    report = compare_scores(TRUTH, scores, scores, 0.0, 1.1, resamples=100, permutations=200)
    assert report["metrics"]["sensitivity"]["a"]["estimate"] == 1.0  # everything called positive
    assert report["metrics"]["sensitivity"]["b"]["estimate"] == 0.0  # nothing called positive
    assert report["metrics"]["auc"]["difference"] == 0.0  # the AUC does not depend on the threshold
    assert report["metrics"]["sensitivity"]["p_value"] < 0.01


def test_fl_against_wl_grade_models_paired_by_specimen(use_cascade):
    report = compare_models("casc-FL-grade", "casc-WL-grade", resamples=200, permutations=500, seed=3)
    assert report["task"] == "grade" and report["split"] == "test"
    assert [report["models"][k]["modality"] for k in ("a", "b")] == ["FL", "WL"]
    specimens = pd.DataFrame(report["specimens"])
    with read_scope() as session:
        graded = [
            set(frame.loc[frame["grade"].notna(), "specimen"])
            for frame in (repo.specimen_images(session, modality, ("test",)) for modality in ("FL", "WL"))
        ]
    assert set(specimens["specimen"]) == graded[0] & graded[1] and specimens["specimen"].is_unique
    assert len(specimens) == report["n_cases"] > 0
    assert report["n_positive"] == int(specimens["truth"].sum()) and 0 < report["n_positive"] < report["n_cases"]
    truth = specimens["truth"].to_numpy()
    for key, column in (("a", "score_a"), ("b", "score_b")):
        expected = binary_metrics(truth, specimens[column].to_numpy(), report["models"][key]["threshold"])
        assert report["metrics"]["accuracy"][key]["estimate"] == pytest.approx(expected["accuracy"])
        assert report["metrics"]["auc"][key]["estimate"] == pytest.approx(auc(truth, specimens[column].to_numpy()))
    # the stored scores are reused: the same seed gives the same report
    again = compare_models("casc-FL-grade", "casc-WL-grade", resamples=200, permutations=500, seed=3)
    assert again["metrics"] == report["metrics"]
    table = comparison_table(report)
    assert list(table["metric"]) == list(model_compare.SHOWN)
    assert {"casc-FL-grade", "casc-WL-grade", "p (permutation)"} <= set(table.columns)
    figure = comparison_figure(report)
    assert [len(trace.y) for trace in figure.data] == [5, 5]
    assert figure.data[0].y[0] == pytest.approx(report["metrics"]["auc"]["a"]["estimate"])


def test_models_of_different_tasks_or_without_shared_specimens_are_refused(use_cascade, monkeypatch):
    with pytest.raises(CompareError, match="grade model.*tumor model"):
        compare_models("casc-FL-grade", "casc-WL-tumor")
    with pytest.raises(CompareError, match="not with itself"):
        compare_models("casc-FL-grade", "casc-FL-grade")
    with pytest.raises(CompareError, match="no registered model"):
        compare_models("casc-FL-grade", "no-such-model")

    def disjoint(model, split, progress):
        offset = 0 if model.modality == "FL" else 100
        return pd.DataFrame({"specimen": [f"S{offset + i}" for i in range(4)], "truth": [0, 1, 0, 1], "score": 0.5})

    monkeypatch.setattr(model_compare, "_scored", disjoint)
    with pytest.raises(CompareError, match="share no scored specimen"):
        compare_models("casc-FL-grade", "casc-WL-grade")


def test_the_command_writes_table_report_and_figure(use_cascade, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare-models", "casc-FL-ki67", "casc-WL-ki67", "--out", str(out), "--bootstrap", "100"]
    assert main([*argv, "--permutations", "200"]) == 0
    printed = capsys.readouterr().out
    assert "casc-FL-ki67 (FL" in printed and "p (permutation)" in printed
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["metric"] for r in rows] == list(model_compare.SHOWN)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "ki67" and report["method"]["permutations"] == 200
    assert float(rows[0]["p (permutation)"]) == pytest.approx(report["metrics"]["auc"]["p_value"])
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare-models", "casc-FL-ki67", "casc-FL-tumor", "--out", str(tmp_path / "no")]) == 2
    assert "only models of the same task compare" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
