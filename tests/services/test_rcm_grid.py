"""Seed 002's Table 2 whole as one study (``rcm-grid``): 54 rows from one pass per (method, step), per-mosaic AUC and
Dice, patch accuracy at 0.5, Fig. 11's bootstrap ROC band on the Models page; and the paper's recipe with noise and
blur from ``python -m core train``. tiny_cnn stand-ins, 64-96 px mosaics, one epoch: plumbing and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from streamlit.testing.v1 import AppTest

import core.heatmaps.mosaic_sigmas as mosaic_sigmas
import services.localization as localization
from core.data.synth_rcm import make_rcm_mosaic, sample_patches, write_mosaic_folder
from core.heatmaps.mosaic import stitch_mosaic
from core.metrics.localization import mask_labels
from core.models import load_checkpoint
from db import repo
from db.session import init_db, session_scope
from services.cli import main as cli
from services.localization import MOSAIC_STUDIES, check_overrides, per_mosaic_scores, run_mosaic_study, study_titles
from services.mosaic import patch_tensors

MODELS_PAGE = str(Path(__file__).resolve().parents[2] / "pages" / "models.py")
SIGMAS = ("no Gaussian", "σ 1", "σ 2.5", "σ 5", "σ 6", "σ 7", "σ 8", "σ 9", "σ 10")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_grid_is_table_2_whole_at_the_papers_steps_for_a_256_px_window():
    spec = MOSAIC_STUDIES["rcm-grid"]
    labels = [row.label("efficientnet_b2", row.step_px(256, 256)) for row in spec.rows]
    expected = [
        f"EfficientNet-B2 + {method}, step {step}, {sigma}"
        for method in ("CAM", "Score-CAM")
        for step in (25, 50, 100)
        for sigma in SIGMAS
    ]
    assert labels == expected and len(labels) == 54
    assert [row.step_px(64, 64) for row in spec.rows[:27:9]] == [6, 12, 25]  # scaled with the study's window
    assert {row.mode for row in spec.rows} == {"exact"} and set(spec.models) == {"main"}
    assert "rcm-grid" in study_titles() and MOSAIC_STUDIES["rcm"].rows[0].step == 0.25  # rcm kept as it was


def test_per_mosaic_scores_leave_one_class_mosaics_without_auc():
    mixed = np.array([[1, 0], [0, -1]], np.int8)
    benign = np.zeros((2, 2), np.int8)
    maps = [np.array([[0.9, 0.2], [0.6, 0.4]]), np.array([[0.1, 0.3], [0.2, 0.0]])]
    scores = per_mosaic_scores(maps, [mixed, benign], 0.5)
    assert scores["mosaic_auc"] == [1.0, None]  # the all-benign mosaic has no ROC (the paper's Fig. 10)
    assert scores["mosaic_dice"] == [pytest.approx(2 / 3), None]  # 0/0: nothing positive, nothing called
    assert scores["mosaic_dice_threshold"] == 0.5


def test_the_grid_study_stitches_each_step_once_and_stores_rows_fig_11_and_patch_accuracy(workspace, monkeypatch):
    windows_explained: list[int] = []
    real = mosaic_sigmas.stitch_mosaic

    def counting(model, strip, **options):
        windows_explained.append(strip.shape[-1] // options["window"])
        return real(model, strip, **options)

    monkeypatch.setattr(mosaic_sigmas, "stitch_mosaic", counting)
    augmentation = check_overrides("rcm-grid", {"main": {"noise": 0.05, "blur": 1}})["main"]
    overrides = {"main": {"architecture": "tiny_cnn", "model_kwargs": {"width": 4}, **augmentation}}
    report = run_mosaic_study(
        "rcm-grid", counts=(2, 1, 2), size=64, window=32, patches=24, epochs=1, bootstrap=40, prefix="grid",
        progress=None, log=lambda _: None, overrides=overrides,
    )  # fmt: skip
    table = report["tables"][0]
    rows = table["rows"]
    assert [r["row"] for r in rows] == [
        f"tiny CNN + {method}, step {step}, {sigma}"
        for method in ("CAM", "Score-CAM")
        for step in (3, 6, 12)
        for sigma in SIGMAS
    ]
    grid = {3: 11, 6: 6, 12: 3}  # windows per side of a 64 px mosaic, 32 px window
    assert all(r["windows"] == grid[r["step"]] ** 2 and r["stitch_shared_by"] == 9 for r in rows)
    # each (method, step) pass explains every window of every test mosaic once, not once per sigma
    assert sum(windows_explained) == 2 * 2 * sum(n * n for n in grid.values())
    assert len({r["pixel_auc"] for r in rows[:9]}) > 1  # the sigmas weight the same maps differently

    with session_scope() as session:
        main = repo.find_model(session, report["models"]["main"])
        stored = repo.model_evaluations(session, main.id)
    assert main.metrics["noise"] == 0.05 and main.metrics["blur"] == 1
    assert stored[0]["report"]["tables"][0]["rows"] == rows

    # one row recomputed from the checkpoint: pooled best Dice by brute force, per-mosaic AUC and Dice
    model, _ = load_checkpoint(workspace / main.checkpoint_path, expected_sha256=main.checkpoint_sha256)
    seeds = stored[0]["dataset"]["mosaic_seeds"]["test"]
    test = [make_rcm_mosaic(64, 64, seed=seed) for seed in seeds]
    masks = [mask_labels(mask) for _, mask in test]
    row = rows[9 + 3]  # CAM, step 6, sigma 5
    maps = [stitch_mosaic(model, image, window=32, step=6, sigma=5.0, mode="exact").map for image, _ in test]
    labeled = [k >= 0 for k in masks]
    values = np.concatenate([m[sel] for m, sel in zip(maps, labeled, strict=True)])
    truth = np.concatenate([k[sel] == 1 for k, sel in zip(masks, labeled, strict=True)])
    dice = [2 * (truth & (values >= t)).sum() / (truth.sum() + (values >= t).sum()) for t in np.arange(51) / 50]
    assert row["best_dice"] == pytest.approx(max(dice), abs=1e-6)
    assert row["best_dice_threshold"] == pytest.approx(int(np.argmax(dice)) / 50)
    for index, (m, k) in enumerate(zip(maps, masks, strict=True)):
        ones = k[k >= 0] == 1
        expected = roc_auc_score(ones, m[k >= 0]) if 0 < ones.sum() < ones.size else None
        assert row["mosaic_auc"][index] == pytest.approx(expected, abs=1e-6)
        called = m[k >= 0] >= row["best_dice_threshold"]
        assert row["mosaic_dice"][index] == pytest.approx(2 * (ones & called).sum() / (ones.sum() + called.sum()))

    # patch accuracy at 0.5: 24 patches of each test mosaic, labelled by their centre pixel
    drawn = [sample_patches(im, mk, 24, size=32, seed=100_000 + i, balanced=False) for i, (im, mk) in enumerate(test)]
    with torch.no_grad():
        logits = model(patch_tensors(np.concatenate([p for p, _ in drawn])))[:, 0].numpy()
    accuracy = float(np.mean((expit(logits) >= 0.5) == np.concatenate([y for _, y in drawn])))
    assert report["patch_accuracy"]["main"]["patches"] == 48
    assert all(r["patch_accuracy"] == pytest.approx(accuracy) for r in rows)

    # Fig. 11: the best CAM and the best Score-CAM row, mean ROC and band, CSV and plotly JSON
    figure = table["figures"]["bootstrap_roc"]
    best = [max(rows[i : i + 27], key=lambda r: r["pixel_auc"])["row"] for i in (0, 27)]
    assert list(figure["auc"]) == best and figure["resamples"] == {label: 40 for label in best}
    curves = pd.read_csv(workspace / figure["csv"])
    assert list(curves["row"].unique()) == best and len(curves) == 2 * 201
    assert (curves["tpr_low"] <= curves["tpr_high"]).all()
    for label, curve in curves.groupby("row"):
        area = np.trapezoid(curve["tpr_mean"], curve["fpr"])
        assert figure["auc"][label] == pytest.approx(area)
    plot = pio.from_json((workspace / figure["figure"]).read_text())
    assert [t.line.dash for t in plot.data] == [None, "dash", "dash"] * 2
    assert len(table["examples"][0]["maps"]) == 2  # 54 rows: the examples show the Fig. 11 rows

    at = _signed_in("pi")
    assert not at.exception
    charts = [c for c in at.get("plotly_chart") if "Fig. 11" in c.proto.spec]
    assert len(charts) == 1
    shown = next(d.value for d in at.dataframe if "Method" in d.value.columns)
    assert len(shown) == 54 and "Patch accuracy at 0.5" in shown.columns


def _signed_in(role: str) -> AppTest:
    init_db()
    with session_scope() as session:
        user_id = repo.create_user(session, f"{role}-grid", "pw-long-enough-1", role).id
    at = AppTest.from_file(MODELS_PAGE, default_timeout=60)
    at.session_state["auth_user_id"] = user_id
    return at.run()


def test_cli_trains_by_the_papers_recipe_with_noise_and_blur(workspace, tmp_path, capsys):
    folder = tmp_path / "mosaics"
    write_mosaic_folder(folder, counts=(1, 1, 1), size=96, seed=0)
    flags = ["train", "--mosaics", str(folder), "--architecture", "resnet18", "--image-size", "32"]
    flags += ["--patches", "16", "--epochs", "1", "--batch-size", "8", "--name", "rcm-paper"]
    paper = ["--recipe", "rcm", "--weight-decay", "5e-4", "--dropout", "0.75", "--noise", "0.05", "--blur", "1"]
    assert cli([*flags, *paper]) == 0
    with session_scope() as session:
        model = repo.find_model(session, "rcm-paper")
    assert (model.task, model.modality) == ("aspecific", "RCM")
    assert model.metrics["recipe"] == "rcm" and model.metrics["weight_decay"] == 5e-4
    assert model.metrics["noise"] == 0.05 and model.metrics["blur"] == 1.0
    assert model.config["model_kwargs"]["drop_rate"] == 0.75 and model.config["noise"] == 0.05
    for bad, message in ((["--noise", "1.5"], "--noise"), (["--blur", "-1"], "--blur")):
        assert cli([*flags, "--name", "refused", *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    documented = " ".join(capsys.readouterr().out.split())  # the flags with their units
    assert "--noise SIGMA" in documented and "grey levels of the [0, 1] intensity scale" in documented
    assert "--blur SIGMA" in documented and "[0, SIGMA] px" in documented


def test_noise_and_blur_are_study_overrides_with_their_ranges(workspace, capsys):
    assert check_overrides("rcm-grid", {"main": {"noise": 0.05, "blur": 1}}) == {"main": {"noise": 0.05, "blur": 1}}
    for value in (1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"main.noise is an SD in grey levels"):
            check_overrides("rcm", {"main": {"noise": value}})
    with pytest.raises(ValueError, match=r"baseline.blur is an SD in px"):
        check_overrides("rcm", {"baseline": {"blur": 64}})
    assert cli(["localization-study", "rcm-grid", "--set", "main.noise=2"]) == 2
    assert "main.noise is an SD" in capsys.readouterr().err
    assert localization.ModelPlan("tiny_cnn", noise=0.1).config(epochs=1, seed=0).noise == 0.1


def test_train_jobs_carry_checked_noise_and_blur(workspace):
    from services.jobs.kinds import check_params

    init_db()
    _, complete = check_params("train", {"architecture": "resnet18", "noise": 0.05, "blur": 1.5})
    assert (complete["noise"], complete["blur"]) == (0.05, 1.5)
    assert check_params("train", {"architecture": "resnet18"})[1]["noise"] == 0.0  # off unless asked
    for params in ({"noise": 1.0}, {"blur": -1}, {"noise": "some"}, {"blur": True}):
        with pytest.raises(ValueError, match="must be a number in"):
            check_params("train", {"architecture": "resnet18", **params})


def test_cli_runs_the_grid_by_name_with_noise_set_and_prints_patch_accuracy(workspace, monkeypatch, tmp_path, capsys):
    from dataclasses import replace

    spec = MOSAIC_STUDIES["rcm-grid"]
    tiny = replace(spec.models["main"], architecture="tiny_cnn", model_kwargs={"width": 4})
    monkeypatch.setitem(MOSAIC_STUDIES, "rcm-grid", replace(spec, models={"main": tiny}))
    out = tmp_path / "grid.json"
    args = ["--counts", "2", "1", "2", "--size", "64", "--window", "32", "--patches", "24", "--epochs", "1"]
    assert (
        cli(
            [
                "localization-study",
                "rcm-grid",
                *args,
                "--bootstrap",
                "10",
                "--set",
                "main.noise=0.05",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "pAcc" in printed and "tiny CNN + Score-CAM, step 12, σ 10" in printed
    report = json.loads(out.read_text())
    assert len(report["tables"][0]["rows"]) == 54 and "bootstrap_roc" in report["tables"][0]["figures"]
    with session_scope() as session:
        assert repo.find_model(session, report["models"]["main"]).metrics["noise"] == 0.05


def test_context_is_a_mosaic_studies_override_in_whole_px():
    assert check_overrides("rcm", {"main": {"context": 32}}) == {"main": {"context": 32}}
    assert check_overrides("rcm-grid", {"main": {"context": 0}}) == {"main": {"context": 0}}
    for value in (-32, 2000, 3.5, True, "32"):
        with pytest.raises(ValueError, match="px of mosaic around each training window"):
            check_overrides("rcm", {"main": {"context": value}})
    with pytest.raises(ValueError, match="mosaic studies only"):
        check_overrides("mlcam", {"main": {"context": 32}})
