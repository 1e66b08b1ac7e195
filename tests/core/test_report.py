"""``python -m core analyze``: the CSV checks (every problem named by its line), the report's shape, and the MRMC
analysis of the Van Dyke data from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.stats.report import AnalysisError, analyze_reads, read_predictions, read_reads
from services.cli import main

VANDYKE = Path(__file__).resolve().parents[1] / "data" / "vandyke.csv"  # a copy of ../shared/data/mrmc/
METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def _study(n=120, readers=3, seed=0, arms=("",)):
    """A simulated study: truth, a model score that separates the classes, readers right about 80 % of the time."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.4).astype(int)
    score = np.clip(0.5 + (truth - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0, 1)
    cases = [f"C{i:03d}" for i in range(n)]
    predictions = pd.DataFrame({"case_id": cases, "truth": truth, "score": score.round(4)})
    rows = []
    for arm in arms:
        for r in range(readers):
            right = rng.random(n) < 0.8
            label = np.where(right, truth, 1 - truth)
            rating = np.clip(np.where(label == 1, 4, 2) + rng.integers(-1, 2, n), 1, 5)
            rows += [
                {"case_id": c, "reader_id": f"R{r}", "arm": arm, "label": int(lab), "rating": int(rt)}
                for c, lab, rt in zip(cases, label, rating, strict=True)
            ]
    return predictions, pd.DataFrame(rows)


def _csv(tmp_path, name, frame):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_the_cli_writes_the_table_one_report(tmp_path):
    predictions, reads = _study()
    out = tmp_path / "report.json"
    code = main(
        [
            "analyze",
            "--predictions", str(_csv(tmp_path, "p.csv", predictions)),
            "--reads", str(_csv(tmp_path, "r.csv", reads.drop(columns="arm"))),
            "--policy", "youden", "--bootstrap", "200", "--permutations", "500", "--seed", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["threshold"]["policy"] == "youden" and 0 <= report["threshold"]["value"] <= 1
    assert set(report["raters"]) == {"model", "R0", "R1", "R2", "readers_mean"}
    for rater, metrics in report["raters"].items():
        for metric in METRICS:
            estimate, (low, high) = metrics[metric]["estimate"], metrics[metric]["ci"]
            assert low <= estimate <= high, (rater, metric)
    assert "auc" in report["raters"]["model"] and "auc" in report["raters"]["R0"]  # readers gave ratings
    pairs = {(c["a"], c["b"], c["metric"]) for c in report["comparisons"]}
    assert {("model", b, m) for b in ("R0", "R1", "R2", "readers_mean") for m in METRICS} <= pairs
    assert all(0 < c["p_value"] <= 1 and c["ci"][0] <= c["difference"] <= c["ci"][1] for c in report["comparisons"])
    again = tmp_path / "again.json"
    main(
        ["analyze", "--predictions", str(tmp_path / "p.csv"), "--reads", str(tmp_path / "r.csv"),
         "--policy", "youden", "--bootstrap", "200", "--permutations", "500", "--seed", "3", "--out", str(again)]
    )  # fmt: skip
    assert json.loads(again.read_text()) == report  # seeded: the same report


def test_several_arms_are_analysed_separately():
    predictions, reads = _study(arms=("FL", "WL"))
    report = analyze_reads(predictions, reads, threshold=0.5, bootstrap=50, permutations=50)
    assert set(report["arms"]) == {"FL", "WL"} and report["arm"] == "FL"
    assert report["raters"] == report["arms"]["FL"]["raters"] != report["arms"]["WL"]["raters"]


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ("case_id,truth\nA,1\n", "missing column(s) score"),
        ("case_id,truth,score\nA,1,0.2\nA,0,0.4\n", "line 3: case_id 'A' already on line 2"),
        ("case_id,truth,score\nA,2,0.2\nB,0,0.4\n", "line 2: truth must be 0 or 1, not '2'"),
        ("case_id,truth,score\nA,1,high\nB,0,1.4\n", "line 3: score must be a number in [0, 1], not '1.4'"),
        ("case_id,truth,score\nA,1,0.3\nB,1,0.4\n", "the analysis needs both classes"),
        ("case_id,truth,score\n", "no rows"),
    ],
)
def test_bad_predictions_name_the_row(predictions, message):
    with pytest.raises(AnalysisError) as error:
        read_predictions(predictions.encode())
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("reads", "message"),
    [
        ("case_id,reader_id\nA,r1\n", "missing column(s) label"),
        ("case_id,reader_id,label\nA,r1,1\nB,r1,0\nZ,r1,1\n", "line 4: unknown case_id 'Z'"),
        ("case_id,reader_id,label\nA,r1,1\nA,r1,0\nB,r1,0\n", "line 3: duplicate read of 'A' by 'r1' (also line 2)"),
        ("case_id,reader_id,label\nA,r1,yes\nB,r1,0\n", "line 2: label must be 0 or 1, not 'yes'"),
        ("case_id,reader_id,label\nA,r1,1\nB,r1,0\nA,r2,1\n", "reader 'r2' read 1 of 2 cases (no read of B)"),
        (
            "case_id,reader_id,label,arm\nA,r1,1,FL\nB,r1,0,FL\nA,r2,1,FL\nB,r2,1,FL\nA,r1,1,WL\nB,r1,1,WL\n",
            "reader 'r2' read nothing in arm 'WL'",
        ),
        ("case_id,reader_id,label,rating\nA,r1,1,5\nB,r1,0,\n", "gave a rating for some cases but not all"),
    ],
)
def test_bad_reads_name_the_row(reads, message):
    with pytest.raises(AnalysisError) as error:
        read_reads(reads.encode(), ["A", "B"])
    assert message in str(error.value)


def test_the_cli_says_what_is_wrong_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "p.csv"
    bad.write_text("case_id,truth,score\nA,1,0.2\nB,x,0.3\n")
    reads = _csv(tmp_path, "r.csv", pd.DataFrame({"case_id": ["A"], "reader_id": ["r"], "label": [1]}))
    assert main(["analyze", "--predictions", str(bad), "--reads", str(reads), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: predictions: 1 problem(s)") and "line 3: truth must be 0 or 1" in err
    assert "Traceback" not in err and not (tmp_path / "o.json").exists()
    assert main(["analyze", "--out", str(tmp_path / "o.json")]) == 2
    assert "needs --predictions" in capsys.readouterr().err
    assert main(["analyze", "--predictions", str(tmp_path / "nope.csv"), "--reads", str(reads), "--out", "x"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(not VANDYKE.exists(), reason="../shared/data/mrmc/vandyke.csv is not here")
def test_the_mrmc_report_reproduces_van_dyke(tmp_path):
    out = tmp_path / "mrmc.json"
    assert main(["analyze", "--ratings", str(VANDYKE), "--mrmc", "--out", str(out)]) == 0
    mrmc = json.loads(out.read_text())["mrmc"]
    assert [round(v, 8) for v in mrmc["auc"]["0"].values()] == [
        0.91964573,
        0.85877617,
        0.90386473,
        0.97310789,
        0.82979066,
    ]
    assert (round(mrmc["mean_auc"]["0"], 8), round(mrmc["mean_auc"]["1"], 8)) == (0.89703704, 0.94083736)
    rrrc, frrc, rrfc = mrmc["rrrc"], mrmc["frrc"], mrmc["rrfc"]
    assert round(rrrc["difference"], 8) == -0.04380032 and round(rrrc["se"], 5) == 0.02075
    assert (round(rrrc["f"], 2), round(rrrc["ddf"], 2), round(rrrc["p_value"], 4)) == (4.46, 15.26, 0.0517)
    assert [round(c, 5) for c in rrrc["ci"]] == [-0.08796, 0.00036]
    assert (round(frrc["chi2"], 5), round(frrc["p_value"], 4)) == (5.47595, 0.0193)
    assert [round(c, 5) for c in frrc["ci"]] == [-0.08049, -0.00711]
    assert (round(rrfc["f"], 2), round(rrfc["p_value"], 4)) == (8.70, 0.0420)


def test_cells_escaped_against_formulas_are_read_back_as_typed():
    """A file written by ``core.text.csv_bytes`` (a reader id ``@evil``, a case id ``=1+1``) analyses as the values
    people typed, not as ``'@evil``; a DataFrame given directly is taken as it is."""
    from core.text import csv_bytes

    predictions = pd.DataFrame({"case_id": ["=1+1", "B"], "truth": [1, 0], "score": [0.9, 0.2]})
    reads = pd.DataFrame({"case_id": ["=1+1", "B"], "reader_id": "@evil", "label": [1, 0], "rating": [80, 10]})
    written_p, written_r = csv_bytes(predictions), csv_bytes(reads)
    assert b"'=1+1" in written_p and b"'@evil" in written_r  # escaped in the file
    back = read_predictions(written_p)
    assert list(back["case_id"]) == ["=1+1", "B"]
    assert set(read_reads(written_r, back["case_id"])["reader_id"]) == {"@evil"}
    assert list(read_predictions(predictions.assign(case_id=["'=1+1", "B"]))["case_id"]) == ["'=1+1", "B"]
