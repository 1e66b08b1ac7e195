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


def test_synth_rcm_writes_mosaic_folders_and_train_mosaics_registers_a_patch_classifier(workspace, tmp_path, capsys):
    out = tmp_path / "mosaics"
    assert main(["synth", "rcm", "--out", str(out), "--counts", "2", "1", "1", "--size", "96"]) == 0
    assert "train 2, val 1, test 1" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "val").iterdir()) == ["mosaic-7002-mask.png", "mosaic-7002.png"]
    assert main(["synth", "rcm", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    args = ["train", "--mosaics", str(out), "--architecture", "tiny_cnn", "--image-size", "32", "--epochs", "1"]
    assert main([*args, "--patches", "24", "--batch-size", "8", "--name", "cli-rcm"]) == 0
    with session_scope() as session:
        info = repo.find_model(session, "cli-rcm")
    assert (info.task, info.modality, info.image_size) == ("aspecific", "RCM", 32)
    assert info.metrics["test_n"] == 24 and info.config["window"] == 32
    assert main([*args, "--data", str(out)]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_mosaic_folder_is_read_with_its_masks_and_problems_are_named(tmp_path):
    from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, write_mosaic_folder
    from services.mosaic import read_mosaic_folder, train_patch_classifier

    written = write_mosaic_folder(tmp_path / "m", counts=(1, 1, 0), size=64, seed=3)
    assert set(written) == {"train", "val"}
    splits = read_mosaic_folder(tmp_path / "m")
    image, mask = splits["train"][0]
    assert image.dtype == np.uint8 and image.shape == mask.shape == (64, 64)
    assert set(np.unique(mask)) <= {NEGATIVE, UNLABELED, POSITIVE}
    np.testing.assert_array_equal(image, np.asarray(PILImage.open(written["train"][0])))
    # a hand-drawn mask: 255 aspecific, 0 benign, any other grey unlabeled
    drawn = np.zeros((64, 64), np.uint8)
    drawn[:10], drawn[10:20] = 255, 77
    PILImage.fromarray(drawn).save(tmp_path / "m" / "train" / "mosaic-7300-mask.png")
    labels = read_mosaic_folder(tmp_path / "m")["train"][0][1]
    assert (labels[:10] == POSITIVE).all() and (labels[10:20] == UNLABELED).all() and (labels[20:] == NEGATIVE).all()
    PILImage.fromarray(drawn[:32]).save(tmp_path / "m" / "train" / "mosaic-7300-mask.png")
    with pytest.raises(ValueError, match=r"mosaic-7300-mask.png: mask \(64, 32\) px does not match"):
        read_mosaic_folder(tmp_path / "m")
    (tmp_path / "m" / "train" / "mosaic-7300-mask.png").unlink()
    with pytest.raises(ValueError, match="has no mask mosaic-7300-mask.png"):
        read_mosaic_folder(tmp_path / "m")
    (tmp_path / "m" / "train" / "mosaic-7300.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    PILImage.fromarray(drawn).save(tmp_path / "m" / "train" / "mosaic-7300-mask.png")
    with pytest.raises(ValueError, match="mosaic-7300.png"):
        read_mosaic_folder(tmp_path / "m")
    for path in (tmp_path / "m" / "train").glob("mosaic-7300*"):  # the only training mosaic (seed 3)
        path.unlink()
    with pytest.raises(ValueError, match="train holds no mosaics"):
        read_mosaic_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="not a folder"):
        read_mosaic_folder(tmp_path / "nothing")
    with pytest.raises(ValueError, match="splits must be"):
        train_patch_classifier(None, {"train": [], "validation": []}, name="x")


def test_train_mosaics_with_context_records_it_and_a_bad_context_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "mosaics"
    assert main(["synth", "rcm", "--out", str(out), "--counts", "2", "1", "1", "--size", "96"]) == 0
    args = ["train", "--mosaics", str(out), "--architecture", "tiny_cnn", "--image-size", "32", "--epochs", "1"]
    args += ["--patches", "16", "--batch-size", "8"]
    assert main([*args, "--context", "8", "--name", "cli-rcm-context"]) == 0
    with session_scope() as session:
        info = repo.find_model(session, "cli-rcm-context")
    assert info.architecture == "tiny_cnn" and info.config["context"] == 8 and info.config["window"] == 32
    capsys.readouterr()
    assert main([*args, "--context", "5", "--name", "cli-rcm-bad"]) == 2
    assert "multiple of tiny_cnn's stride (8 px)" in capsys.readouterr().err
    assert main(["train", "--context", "8", "--architecture", "tiny_cnn"]) == 2
    assert "give --mosaics" in capsys.readouterr().err
    assert main([*args, "--context", "8", "--padded-fraction", "0.5", "--name", "cli-rcm-mixed"]) == 0
    assert main([*args, "--padded-fraction", "0.5", "--name", "cli-rcm-nocontext"]) == 2
    assert "needs context > 0" in capsys.readouterr().err
    with session_scope() as session:
        assert repo.find_model(session, "cli-rcm-mixed").config["padded_fraction"] == 0.5
        assert repo.find_model(session, "cli-rcm-nocontext") is None
    with session_scope() as session:
        assert repo.find_model(session, "cli-rcm-bad") is None
