"""The study-analysis benchmark times the report and the loop baseline, and the two give the same numbers (timings
are not judged here)."""

import json
import math

import pytest
import torch

from bench.analysis import MEASUREMENTS, agreement, main


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A ``--quick`` run on one thread (torch's thread count restored afterwards)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "analysis-cpu-quick.json").read_text())


def test_quick_run_writes_settings_study_and_every_measurement(document: dict):
    assert set(document) == {"machine", "settings", "study", "goal_seconds", "agreement", "seconds", "rows"}
    settings = document["settings"]
    assert (settings["cases"], settings["bootstrap"], settings["permutations"], settings["repeats"]) == (60, 50, 200, 2)
    study = document["study"]
    assert (study["cases"], study["tumor"], study["readers"], study["arms"]) == (60, 36, 3, ["FL", "WL"])
    assert document["machine"]["thread_pools"] and document["goal_seconds"] == 2.0
    assert [row["measurement"] for row in document["rows"]] == list(MEASUREMENTS)


def test_timings_are_positive_and_finite_and_the_loop_is_timed_for_the_report(document: dict):
    rows = {row["measurement"]: row for row in document["rows"]}
    for name, row in rows.items():
        assert row["label"] == MEASUREMENTS[name] and row["repeats"] == 2
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("median_ms", "best_ms")), row
        assert row["best_ms"] <= row["median_ms"]
        if name == "validation":
            assert row["loop_ms"] is None and row["x_loop"] is None
        else:
            assert math.isfinite(row["loop_ms"]) and row["loop_ms"] > 0
            assert row["x_loop"] == pytest.approx(row["loop_ms"] / row["median_ms"])
    parts = ("analyze_reads", "analyze_mrmc", "model_vs_readers")
    assert rows["report"]["loop_ms"] == pytest.approx(sum(rows[name]["loop_ms"] for name in parts))
    assert document["seconds"] > 0


def test_loop_and_vectorized_numbers_agree(document: dict):
    agreed = document["agreement"]
    assert agreed["agree"], agreed
    # both arms: 5 raters' metrics, 4 AUCs, 24 comparisons with p-values, 3 DeLong rows; MRMC; model vs readers
    assert agreed["numbers_compared"] > 400 and not agreed["missing_in_report"] and not agreed["outside_tolerance"]
    assert agreed["permutation_p_values"] == 2 * 6 * 4 and not agreed["permutation_p_values_differing"]
    assert agreed["max_abs_difference"] < 1e-9


def test_agreement_catches_a_changed_p_value_a_lost_nan_and_a_missing_key():
    vectorized = {"FL/model-r1/f1/p_value": 0.02, "FL/model-r1/ppv/estimate": math.nan, "mrmc/rrrc/f": 4.0}
    assert agreement(vectorized, dict(vectorized))["agree"]
    changed = agreement(vectorized, vectorized | {"FL/model-r1/f1/p_value": 0.0201, "mrmc/rrrc/f": 4.0 + 1e-12})
    assert changed["permutation_p_values_differing"] == ["FL/model-r1/f1/p_value"] and not changed["agree"]
    assert changed["outside_tolerance"] == ["FL/model-r1/f1/p_value"]  # 1e-12 on 4.0 is within the tolerance
    assert agreement(vectorized, vectorized | {"FL/model-r1/ppv/estimate": 0.5})["outside_tolerance"] == [
        "FL/model-r1/ppv/estimate"
    ]
    assert agreement(vectorized, vectorized | {"WL/model-r1/f1/p_value": 0.5})["missing_in_report"] == [
        "WL/model-r1/f1/p_value"
    ]
