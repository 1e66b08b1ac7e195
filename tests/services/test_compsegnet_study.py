"""The CompSegNet study (seed 004) end to end on a tiny spectral set: CompSegNet trains and maps with the background
masked in its input, each row gains Dice per cancer spot (mean, SD) and the Figure S3 spot AUC, and the table the
spot and pixel ROCs as CSV and plotly JSON. Tiny models and one epoch: plumbing and scoring, not performance."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
import torch

from core.data.localization_set import generate_set, read_set
from core.data.synth_spectral import tissue_mask
from core.metrics.localization import dice_per_image, fraction_above, mask_labels, roc_points
from core.models import load_checkpoint
from core.models.compsegnet import tissue_of
from db import repo
from db.session import session_scope
from services.localization import STUDIES, ModelPlan, background_masked, run_study


@pytest.fixture
def tiny_study(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compsegnet study with a small U-Net and tiny_cnn in place of ResNet-18."""
    spec = STUDIES["compsegnet"]
    models = {
        "main": replace(spec.models["main"], model_kwargs={"base": 4, "depth": 2}),
        "baseline": ModelPlan("tiny_cnn", {"width": 8}, epochs=1, batch_size=4),
    }
    monkeypatch.setitem(STUDIES, "compsegnet", replace(spec, models=models))


def test_a_masked_set_marks_background_spectra_nan_and_keeps_tissue_and_labels(tmp_path):
    data = generate_set("spectral", tmp_path / "ir", counts=(3, 2, 2), size=32, channels=8, seed=2)
    masked = background_masked(data)
    x, y = data.tensors("val")
    masked_x, masked_y = masked.tensors("val")
    tissue = np.stack([tissue_mask(m) for m in data.masks("val", "tumor")])
    assert 0 < tissue.mean() < 1
    torch.testing.assert_close(masked_y, y)
    on_tissue = torch.from_numpy(tissue)[:, None].expand_as(x)
    torch.testing.assert_close(masked_x[on_tissue], x[on_tissue])
    assert bool(masked_x[~on_tissue].isnan().all())
    np.testing.assert_array_equal(tissue_of(masked_x).numpy(), tissue)
    assert masked.describe()["input"].startswith("background") and "input" not in data.describe()
    with pytest.raises(ValueError, match="spectral"):
        background_masked(replace(data, kind="cle"))


def test_the_study_adds_dice_per_spot_and_writes_the_rocs(workspace, tiny_study, tmp_path):
    report = run_study(
        "compsegnet", data_dir=tmp_path / "ir", counts=(8, 4, 6), size=32, channels=8, epochs=1, bootstrap=0,
        progress=None, log=lambda _: None,
    )  # fmt: skip
    table = report["tables"][0]
    for row in table["rows"]:
        assert row["dice_spots"] == 3  # the cancer test spots (half of 6)
        assert 0.0 <= row["dice_spot_mean"] <= 1.0 and row["dice_spot_sd"] >= 0.0
        assert row["spot_auc"] is None or 0.0 <= row["spot_auc"] <= 1.0
    figures = table["figures"]
    for name in ("spot_roc", "pixel_roc"):
        frame = pd.read_csv(workspace / figures[name]["csv"])
        assert list(frame.columns) == ["row", "threshold", "fpr", "tpr"]
        assert set(frame["row"]) == {r["row"] for r in table["rows"]}
        for _, curve in frame.groupby("row"):
            assert (curve["fpr"].iloc[0], curve["tpr"].iloc[0]) == (0.0, 0.0)
            assert (curve["fpr"].iloc[-1], curve["tpr"].iloc[-1]) == (1.0, 1.0)
            assert curve["fpr"].is_monotonic_increasing and curve["tpr"].is_monotonic_increasing
        figure = pio.from_json((workspace / figures[name]["figure"]).read_text())
        assert [trace.name.split(" (AUC")[0] for trace in figure.data] == [r["row"] for r in table["rows"]]
    assert figures["pixel_roc"]["auc"] == pytest.approx({r["row"]: r["pixel_auc"] for r in table["rows"]})
    assert figures["spot_roc"]["auc"] == {r["row"]: r["spot_auc"] for r in table["rows"]}

    # The CompSegNet row recomputed from the registered checkpoint, on the masked input it was trained on.
    with session_scope() as session:
        main = repo.find_model(session, report["models"]["main"])
        baseline = repo.find_model(session, report["models"]["baseline"])
        stored = repo.model_evaluations(session, main.id)[0]["report"]["tables"][0]
    assert json.loads(json.dumps(stored["rows"])) == json.loads(json.dumps(table["rows"]))
    assert main.config["dataset"]["input"].startswith("background") and "input" not in baseline.config["dataset"]
    model, _ = load_checkpoint(workspace / main.checkpoint_path, expected_sha256=main.checkpoint_sha256)
    data = background_masked(read_set(tmp_path / "ir"))
    x, y = data.tensors("test")
    with torch.no_grad():
        maps = model.segment(x).numpy()
    assert (maps[np.isnan(x.numpy()).all(axis=1)] == 0).all()  # no sample, no tumour
    masks = [mask_labels(m) for m in data.masks("test", "tumor")]
    cancer = np.flatnonzero(y.numpy() == 1)
    dice = dice_per_image([maps[i] for i in cancer], [masks[i] for i in cancer], 0.35)
    row = table["rows"][0]
    assert row["dice_spot_mean"] == pytest.approx(dice["mean"]) and row["dice_spot_sd"] == pytest.approx(dice["sd"])
    assert row["spot_auc"] == roc_points(y.numpy(), fraction_above(list(maps), masks, 0.35))["auc"]
    assert row["image_auc"] == pytest.approx(row["spot_auc"])  # its sample score is the tissue's tumour share

    # The Models page draws both curves under the table, and says so when a figure file is gone.
    from streamlit.testing.v1 import AppTest

    with session_scope() as session:
        pi = repo.create_user(session, "pi-figures", "pw-long-enough-1", "pi").id
    page = str(Path(__file__).resolve().parents[2] / "pages" / "models.py")
    at = AppTest.from_file(page, default_timeout=60)
    at.session_state["auth_user_id"] = pi
    at.run()
    assert not at.exception
    charts = [c for c in at.get("plotly_chart") if "Figure S3" in c.proto.spec or "Tissue pixels" in c.proto.spec]
    assert len(charts) == 2
    assert any("Dice per spot" in d.value.columns for d in at.dataframe)
    (workspace / figures["spot_roc"]["figure"]).unlink()
    at.run()
    assert not at.exception
    assert any("is missing from the workspace" in c.value for c in at.caption)
