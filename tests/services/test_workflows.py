"""Import, train-and-register, diagnose and the CLI, end to end on a tiny cohort and tiny models."""

import json
import os

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image as PILImage

from db import repo
from db.session import session_scope
from services.cli import main
from services.diagnose import diagnose_files, extras_path, load_predictor
from services.importer import import_manifest

RETINA = os.path.join(skimage.data.data_dir, "retina.jpg")


def test_import_stores_images_by_content_and_splits_by_patient(use_trained):
    with session_scope() as s:
        specimens = repo.table(s, "specimens")
        images = repo.specimen_images(s, "FL")
    assert specimens["split"].notna().all()
    assert specimens.groupby("patient")["split"].nunique().max() == 1  # never one patient in two splits
    assert set(specimens["split"]) == {"train", "val", "test"}
    merged = images.merge(specimens, on="specimen")
    assert len(merged) == len(specimens)
    for path, sha in zip(merged["path"], merged["fl_sha256"], strict=True):
        assert path == f"images/{sha[:2]}/{sha}.png" and (use_trained / path).is_file()


def test_import_reports_bad_rows_and_keeps_the_good_ones(workspace, tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    PILImage.fromarray(np.full((40, 40), 300, np.uint16)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    (folder / "manifest.csv").write_text(
        "patient_id,specimen_id,modality,path,tumor,grade,ki67,split\n"
        "P1,S1,FL,good.png,1,GBM,>=10,train\n"
        "P1,S2,FL,broken.png,0,,,train\n"
        "P1,S3,XR,good.png,0,,,train\n"
        "P2,S4,FL,good.png,maybe,,,\n"
    )
    report = import_manifest(folder / "manifest.csv")
    assert report.images == 1 and report.specimens == 1
    joined = "\n".join(report.errors)
    assert "line 3" in joined and "broken.png" in joined
    assert "line 4" in joined and "modality" in joined
    assert "line 5" in joined and "tumor" in joined
    with session_scope() as s:
        assert repo.table(s, "specimens")["specimen"].tolist() == ["S1"]


def test_models_are_registered_with_threshold_and_metrics(use_trained, capsys):
    assert main(["models", "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"tiny-FL", "tiny-WL"} <= set(models)
    fl = models["tiny-FL"]
    assert fl["task"] == "tumor" and fl["modality"] == "FL" and 0 <= fl["threshold"] <= 1
    assert {"id", "name", "task", "modality", "threshold"} <= set(fl)
    with session_scope() as s:
        info = repo.find_model(s, "tiny-FL")
    assert info.threshold_policy == "sens90" and info.metrics["val_n"] > 0 and "test_auc" in info.metrics
    assert (use_trained / info.checkpoint_path).is_file()


def test_diagnose_files_stores_good_files_and_refuses_bad_ones(use_trained):
    with session_scope() as s:
        model = repo.find_model(s, "tiny-WL")
        before = len(repo.table(s, "uploads"))
    predictor = load_predictor(model)
    files = [("retina.jpg", RETINA), ("empty.png", b""), ("notes.png", b"just text, not an image")]
    outcomes = diagnose_files(predictor, model, files, user_id=None)
    good, empty, text = outcomes
    assert good.error is None and 0 <= good.probability <= 1 and good.decision == (good.probability >= good.threshold)
    heatmap = np.load(use_trained / good.heatmap)
    assert heatmap.shape == PILImage.open(RETINA).size[::-1] and heatmap.dtype == np.float32
    assert "empty" in empty.error and text.error
    with session_scope() as s:
        uploads = repo.table(s, "uploads")
        assert len(uploads) == before + 1 and uploads.iloc[0]["original_name"] == "retina.jpg"
        assert repo.prediction_view(s, good.prediction_id)["heatmap_path"] == good.heatmap
        audit = repo.table(s, "audit")
    stored = audit[audit["action"] == "diagnosis_stored"]  # who stored which upload and prediction, when
    assert any(f"prediction={good.prediction_id}" in d and f"upload={good.upload_id}" in d for d in stored["detail"])


def test_cli_predict_writes_outputs_and_exit_2_on_refusals(use_trained, tmp_path, capsys):
    fl = tmp_path / "spec.tif"
    tifffile.imwrite(fl, (np.random.default_rng(0).random((48, 64)) * 4000).astype(np.uint16))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "out"
    code = main(["predict", "--model", "tiny-FL", "--out", str(out), str(fl), RETINA, str(bad)])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and any("retina.jpg" in e and "colour" in e for e in errors)
    record = json.loads((out / "spec.json").read_text())
    assert record["model"] == "tiny-FL" and record["task"] == "tumor" and record["heatmap"]["method"] == "gradcam"
    assert {"file", "probability", "threshold", "decision"} <= set(record)
    heatmap = np.load(record["heatmap"]["npy"])
    assert heatmap.shape == (48, 64) and heatmap.dtype == np.float32 and 0 <= heatmap.min() <= heatmap.max() <= 1
    assert PILImage.open(record["heatmap"]["overlay"]).size == (64, 48)
    assert not (out / "retina.json").exists() and not (out / "bad.json").exists()


def test_cli_predict_gives_every_input_its_own_output_names(use_trained, tmp_path):
    """``x/a-2.tif`` and two ``a.tif`` used to write ``a-2.*`` twice, the second overwriting the first."""
    rng = np.random.default_rng(1)
    files = []
    for folder, name in (("x", "a-2.tif"), ("y", "a.tif"), ("z", "a.tif")):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / name)
        tifffile.imwrite(files[-1], (rng.random((48, 64)) * 4000).astype(np.uint16))
    out = tmp_path / "out"
    assert main(["predict", "--model", "tiny-FL", "--heatmap", "none", "--out", str(out), *map(str, files)]) == 0
    records = sorted(json.loads(p.read_text())["file"] for p in out.glob("*.json"))
    assert records == sorted(map(str, files))


def test_cli_predict_needs_a_model_choice_when_ambiguous(use_trained, tmp_path, capsys):
    assert main(["predict", "--out", str(tmp_path), RETINA]) == 2
    assert "choose one with --model" in capsys.readouterr().err
    assert main(["predict", "--model", "nope", "--out", str(tmp_path), RETINA]) == 2


@pytest.mark.parametrize("argv", [["import", "/nonexistent"], ["models", "--task", "tumor"]])
def test_cli_usage_errors_are_one_line(workspace, argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if argv[0] == "import":
        assert code == 2 and captured.err.startswith("error: ")
    else:
        assert code == 0 and "no models registered" in captured.out


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam-multi", "guided-backprop", "scorecam", "celm"])
def test_cli_predict_with_any_heatmap_method(use_trained, tmp_path, method):
    out = tmp_path / "out"
    assert main(["predict", "--model", "tiny-WL", "--heatmap", method, "--out", str(out), RETINA]) == 0
    record = json.loads((out / "retina.json").read_text())
    assert record["heatmap"]["method"] == method
    heatmap = np.load(record["heatmap"]["npy"])
    assert heatmap.shape == PILImage.open(RETINA).size[::-1] and 0 <= heatmap.min() < heatmap.max() <= 1


def test_guided_gradcam_gives_the_five_views_in_the_cli_and_the_store(use_trained, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", "tiny-WL", "--heatmap", "guided-gradcam", "--out", str(out), RETINA]) == 0
    record = json.loads((out / "retina.json").read_text())
    views = {k for k in record["heatmap"] if k not in ("method", "npy", "png", "overlay")}
    assert views == {"colored_gcam", "gcam_saliency", "saliency_x_image", "gcam_heatmap", "heatmap_x_image"}
    size = PILImage.open(RETINA).size
    assert all(PILImage.open(record["heatmap"][v]).size == size for v in views)
    with session_scope() as s:
        model = repo.find_model(s, "tiny-WL")
    (outcome,) = diagnose_files(
        load_predictor(model), model, [("retina.jpg", RETINA)], user_id=None, heatmap="guided-gradcam"
    )
    with np.load(use_trained / extras_path(outcome.heatmap)) as extras:
        assert extras["guided"].shape == (3, size[1], size[0]) and extras["gradcam"].shape == (size[1], size[0])


def test_heatmaps_command_lists_every_method(capsys):
    assert main(["heatmaps"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line and not line.startswith("use")}
    assert {"cam", "gradcam", "gradcam-multi", "guided-backprop", "guided-gradcam", "scorecam", "celm"} <= listed
