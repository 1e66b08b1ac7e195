"""The pointing game of a registered FL model on its test split: stored at registration, reproducible, baselines
computed on the right specimens, and told in plain sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from core.data.io import read_image
from core.metrics.pointing import brightest_point, point_in_mask, tissue_mask
from db import repo
from services import pointing

KEYS = {
    "method",
    "method_title",
    "tolerance_px",
    "heatmap",
    "brightest",
    "n_images",
    "n_tumor",
    "model_auc",
    "intensity_aucs",
    "best_intensity",
    "best_intensity_auc",
}


def _model(name: str):
    return next(m for m in repo.list_models() if m.name == name)


def test_registration_stores_the_pointing_game_of_an_fl_tumor_model(use_trained: Path) -> None:
    report = _model("tiny-FL").metrics["pointing"]
    assert set(report) == KEYS
    assert report["method"] == "gradcam" and report["tolerance_px"] == 0
    rows = pointing.test_rows("FL")
    with_masks = rows[(rows["tumor"] == 1) & rows["mask_path"].notna()]
    assert report["heatmap"]["n"] == report["brightest"]["n"] == len(with_masks) > 0
    assert report["n_images"] == len(rows) and report["n_tumor"] == int(rows["tumor"].sum())
    for rate in (report["heatmap"], report["brightest"]):
        assert rate["rate"] == rate["hits"] / rate["n"]
        assert rate["ci"][0] <= rate["rate"] <= rate["ci"][1]
    assert report["best_intensity_auc"] == max(report["intensity_aucs"].values())
    assert 0.5 <= report["best_intensity_auc"] <= 1.0


def test_the_brightest_pixel_baseline_is_scored_on_the_test_tumor_masks(use_trained: Path) -> None:
    """Recomputed here from the stored files: the service reads the test split's images and their own masks."""
    rows = pointing.test_rows("FL")
    hits = []
    for row in rows[(rows["tumor"] == 1) & rows["mask_path"].notna()].to_dict("records"):
        image = read_image(use_trained / row["path"]).array
        with PILImage.open(use_trained / row["mask_path"]) as pil:
            mask = np.asarray(pil) > 127
        hits.append(point_in_mask(brightest_point(image, tissue_mask(image)), mask))
    assert _model("tiny-FL").metrics["pointing"]["brightest"]["hits"] == sum(hits)


def test_a_registered_model_can_be_evaluated_again_and_wl_models_are_left_out(use_trained: Path) -> None:
    stored = _model("tiny-FL").metrics["pointing"]
    again = pointing.evaluate_registered(_model("tiny-FL"))
    assert again["brightest"] == stored["brightest"] and again["intensity_aucs"] == stored["intensity_aucs"]
    assert again["heatmap"]["n"] == stored["heatmap"]["n"]
    assert abs(again["model_auc"] - stored["model_auc"]) < 1e-4  # the checkpoint is the model that was scored
    assert pointing.evaluate_registered(_model("tiny-WL")) is None
    assert "pointing" not in _model("tiny-WL").metrics
    assert pointing.applies("tumor", "FL") and not pointing.applies("grade", "FL")


def test_summary_lines_say_what_the_figures_mean() -> None:
    report = {
        "method_title": "Grad-CAM",
        "tolerance_px": 0,
        "heatmap": {"hits": 41, "n": 50, "rate": 0.82, "ci": [0.7, 0.92]},
        "brightest": {"hits": 30, "n": 50, "rate": 0.6, "ci": [0.46, 0.74]},
        "n_images": 80,
        "model_auc": 0.91,
        "best_intensity": "p90",
        "best_intensity_auc": 0.8,
    }
    first, second = pointing.summary_lines(report)
    assert first.startswith("Pointing game: the peak of the Grad-CAM map falls in the tumor for 82 % of 50 test")
    assert "(95 % CI 70 %-92 %)" in first and "the brightest spot of the tissue (no model), for 60 %" in first
    assert "AUC is 0.910, above the best simple brightness figure" in second
    assert "90th percentile" in second and "+0.110" in second
    assert "within 15 px" in pointing.summary_lines({**report, "tolerance_px": 15})[0]
    assert len(pointing.summary_lines({**report, "model_auc": None})) == 1
