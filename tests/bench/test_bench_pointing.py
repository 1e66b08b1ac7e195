"""The pointing benchmark runs end to end in its quick mode and writes the three criteria of issue 17."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.pointing import TARGETS, main


def test_quick_run_writes_the_criteria_with_their_baselines(tmp_path: Path) -> None:
    out = tmp_path / "pointing.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads(out.read_text())
    assert set(document) >= {"machine", "settings", "seconds", "test_auc", "pointing", "criteria"}
    assert document["settings"]["quick"] is True and document["machine"]["threads"] == 1
    assert document["settings"]["demo"]["architecture"] == "tiny_cnn"
    assert set(document["seconds"]) == {"cohort", "fl"}
    assert set(document["criteria"]) == set(TARGETS)
    report = document["pointing"]
    criteria = document["criteria"]
    assert criteria["heatmap"]["value"] == report["heatmap"]["rate"]
    assert criteria["brightest"]["value"] == report["brightest"]["rate"]
    assert criteria["heatmap"]["met"] == (report["heatmap"]["rate"] >= 0.8)
    if report["model_auc"] is not None:
        assert abs(criteria["auc_gap"]["value"] - (report["model_auc"] - report["best_intensity_auc"])) < 1e-3
    assert report["heatmap"]["n"] > 0
