"""The pointing benchmark runs end to end in its quick mode and writes the three criteria of issue 17."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_fl_options_reach_the_trained_model(tmp_path: Path) -> None:
    out = tmp_path / "pointing.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--threads", "1", "--fl-model-option", "width=8", "--fl-no-augment", "--fl-seed", "3"]
        argv += ["--out", str(out)]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads(out.read_text())
    demo = document["settings"]["demo"]
    assert demo["fl_model_options"] == [["width", 8]] and demo["fl_augment"] is False
    assert demo["fl_seed"] == 3 and demo["seed"] == 0
    assert document["model"] == {"architecture": "tiny_cnn", "options": {"width": 8}, "augment": False}


def test_an_option_the_architecture_lacks_is_refused_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--quick", "--fl-model-option", "output_stride=16", "--out", str(tmp_path / "p.json")])
    assert stop.value.code == 2
    assert "tiny_cnn has no option 'output_stride'" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_the_demo_architecture_is_scored_by_its_own_map(tmp_path: Path) -> None:
    out = tmp_path / "pointing.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--threads", "1", "--fl-architecture", "flmil", "--fl-image-size", "32", "--out", str(out)]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads(out.read_text())
    assert document["model"]["architecture"] == "flmil" and document["pointing"]["method"] == "tissue-mil"
