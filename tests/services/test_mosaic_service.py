"""Whole mosaics end to end: a patch classifier trained from mosaic pixel labels, stitched, stored, reopened."""

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from db import repo
from db.session import session_scope
from services.cli import main
from services.diagnose import load_predictor
from services.mosaic import diagnose_mosaic

SIDE = 256  # the side of the conftest's mosaics


def test_patch_classifier_is_registered_with_its_window(in_rcm):
    _, info = in_rcm
    assert info.task == "aspecific" and info.modality == "RCM" and info.image_size == 32
    assert info.config["window"] == 32 and 0.0 <= info.metrics["test_auc"] <= 1.0


def test_a_mosaic_is_stitched_stored_and_reopened(in_rcm):
    root, info = in_rcm
    seen = []
    outcome = diagnose_mosaic(
        load_predictor(info),
        info,
        "mosaic.png",
        root / "mosaic.png",
        user_id=None,
        step=16,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert outcome.error is None and outcome.windows == ((SIDE - 32) // 16 + 1) ** 2
    assert seen[-1][0] == seen[-1][1]
    heatmap = np.load(root / outcome.heatmap)
    assert heatmap.shape == (SIDE, SIDE) and 0.0 <= heatmap.min() <= heatmap.max() <= 1.0
    with session_scope() as s:
        view = repo.prediction_view(s, outcome.prediction_id)
    assert view["mosaic"] and view["probability"] == pytest.approx(outcome.probability)


def test_images_smaller_than_a_window_or_in_colour_are_refused(in_rcm):
    root, info = in_rcm
    small = root / "small.png"
    PILImage.fromarray(np.zeros((20, 40), np.uint8)).save(small)
    colour = root / "colour.png"
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(colour)
    with session_scope() as s:
        before = len(repo.table(s, "uploads"))
    predictor = load_predictor(info)
    for path, words in ((small, "smaller than one 32 px window"), (colour, "colour")):
        outcome = diagnose_mosaic(predictor, info, path.name, path, user_id=None)
        assert outcome.error and words in outcome.error and outcome.prediction_id is None
    with session_scope() as s:
        assert len(repo.table(s, "uploads")) == before


def test_cli_mosaic_writes_map_overlay_and_json(in_rcm, tmp_path, capsys):
    root, _ = in_rcm
    out = tmp_path / "out"
    assert main(["mosaic", str(root / "mosaic.png"), "--step", "25", "--sigma", "0", "--out", str(out)]) == 0
    record = json.loads((out / "mosaic.json").read_text())
    assert record["model"] == "tiny-RCM" and record["sigma"] is None and record["windows"] == 81
    assert np.load(record["map"]).shape == (SIDE, SIDE)
    assert PILImage.open(out / "mosaic_overlay.png").size == (SIDE, SIDE)
    assert "81 windows" in capsys.readouterr().out
    assert main(["mosaic", str(root / "mosaic.png"), "--heatmap", "scorecam", "--out", str(out)]) == 2
