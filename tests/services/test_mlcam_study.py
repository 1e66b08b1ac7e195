"""Seed 000's Table 2 as one study: M1 (MLGAP) and the single-depth networks trained, the ResNet-18 baseline by the
seed's recipe, and the paper's sets (Set1 training images, Set2 validation at both scales, Set3 test, Set4 frames
with features labelled nondiagnostic)."""

from __future__ import annotations

import numpy as np
import pytest

from core.data.localization_set import MISLABELLED, generate_set, read_set
from db import repo
from db.session import session_scope
from services.localization import STUDIES, run_study


def _small(study: str = "mlcam") -> dict:
    """Narrow networks (plumbing, not performance): each plan keeps its own options (depth, pooling)."""
    return {key: {"model_kwargs": {**plan.model_kwargs, "width": 4}} for key, plan in STUDIES[study].models.items()
            if plan.architecture == "mlcam_lici"} | {"baseline": {"architecture": "tiny_cnn"}}  # fmt: skip


def test_a_set_can_hold_frames_with_features_labelled_nondiagnostic(tmp_path):
    data = generate_set("cle", tmp_path / "set", counts=(4, 2, 2), size=32, seed=1, mislabelled=3)
    rows = data.rows(MISLABELLED)
    assert len(rows) == 3 and set(rows["label"]) == {0}
    masks = data.masks(MISLABELLED, "intermediate")
    assert all((mask == 255).any() for mask in masks)  # each holds a diagnostic region
    assert read_set(data.root).rows(MISLABELLED)["image_id"].tolist() == rows["image_id"].tolist()
    assert len(data.rows("train")) == 4  # the training splits are untouched
    with pytest.raises(ValueError, match="only CLE sets"):
        generate_set("spectral", tmp_path / "spots", counts=(2, 2, 2), size=16, channels=4, mislabelled=2)


def test_the_mlcam_study_is_table_2_with_the_papers_sets_and_networks(workspace):
    report = run_study(
        "mlcam", counts=(12, 6, 8), size=32, epochs=1, bootstrap=0, progress=None, log=lambda _: None,
        overrides=_small(),
    )  # fmt: skip
    assert set(report["models"]) == {"main", "mlgap", "depth1", "depth2", "depth3", "baseline"}
    sets = [(t["set"], t["split"], t["mask_set"], t["threshold"]) for t in report["tables"]]
    assert sets == [
        ("Set1", "train", "intermediate", 0.03),
        ("Set2-I", "val", "intermediate", 0.03),
        ("Set2-R", "val", "restrictive", 0.2),
        ("Set3", "test", "intermediate", 0.03),
        ("Set3-R", "test", "restrictive", 0.2),
        ("Set4", MISLABELLED, "intermediate", 0.03),
    ]
    data = read_set(workspace / "datasets" / "cle-32px-seed0")
    counts = {t["set"]: t["n_images"] for t in report["tables"]}
    assert counts["Set1"] == min(30, int(data.rows("train")["label"].sum()))
    assert counts["Set4"] == len(data.rows(MISLABELLED)) == 2  # 55 scaled to the shrunk test split, at least 2
    rows = {row["row"]: row for row in report["tables"][3]["rows"]}
    assert list(rows)[0] == "M1 (MLGAP)" and rows["M1 (MLGAP)"]["map"].startswith("combined DFM")
    assert "M2 (LI+CI)" in rows and "M10 (ResNet-18 + CAM)" in rows
    for name, key in (("M4 (LI, layer 1)", "depth1"), ("M8 (layer 2)", "depth2"), ("M9 (layer 3)", "depth3")):
        trained_alone = rows[f"{name}, trained alone"]
        assert trained_alone["model"] == report["models"][key] and rows[name]["model"] == report["models"]["main"]
    with session_scope() as session:
        infos = {key: repo.find_model(session, name) for key, name in report["models"].items()}
    assert infos["mlgap"].config["model_kwargs"]["pooling"] == "combined"
    assert [infos[f"depth{k}"].config["model_kwargs"]["depth"] for k in (1, 2, 3)] == [1, 2, 3]
    recipes = {key: info.metrics["recipe"] for key, info in infos.items()}
    assert set(recipes.values()) == {"mlcam"}  # the baseline by the seed model's recipe, as the paper trained them
    for table in report["tables"]:
        for row in table["rows"]:
            assert row["pixel_auc"] is None or 0.0 <= row["pixel_auc"] <= 1.0
        assert table["examples"] and all((workspace / p).is_file() for p in table["examples"][0]["maps"].values())
    folders = {p.parent.parent.name for p in (workspace / "models").rglob("map-00.png")}
    assert {"Set1", "Set3", "Set4"} <= folders  # each set's examples in its own folder


def test_a_study_can_train_some_of_its_models_only(workspace):
    report = run_study(
        "mlcam", counts=(8, 4, 4), size=32, epochs=1, bootstrap=0, progress=None, log=lambda _: None,
        overrides=_small(), models=("baseline",),
    )  # fmt: skip
    assert set(report["models"]) == {"main", "baseline"}  # the main model always
    names = {row["row"] for table in report["tables"] for row in table["rows"]}
    assert "M2 (LI+CI)" in names and "M10 (ResNet-18 + CAM)" in names
    assert not any("MLGAP" in name or "trained alone" in name for name in names)
    with pytest.raises(ValueError, match="trains no model depth9"):
        run_study("mlcam", counts=(8, 4, 4), size=32, models=("depth9",), progress=None, log=lambda _: None)


def test_an_older_set_without_mislabelled_frames_leaves_set4_out(workspace, tmp_path):
    data = generate_set("cle", tmp_path / "old", counts=(8, 4, 4), size=32, seed=2)
    seen: list[str] = []
    report = run_study(
        "mlcam", data_dir=data.root, epochs=1, bootstrap=0, progress=None, log=seen.append,
        overrides=_small(), models=(),
    )  # fmt: skip
    assert [t["set"] for t in report["tables"]] == ["Set1", "Set2-I", "Set2-R", "Set3", "Set3-R"]
    assert any("Set4" in line and "left out" in line for line in seen)
    assert np.all([t["n_images"] > 0 for t in report["tables"]])
