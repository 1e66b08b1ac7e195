"""Localisation data sets, training from image-level labels, the seed studies and their stored tables, the CLI
commands and the Models page. Tiny sets (64 px CLE frames, 32 px 16-channel spots, 160 px RCM mosaics) and one or two
epochs: these tests check the plumbing and the scoring, not how well the models localise (bench/README.md has those
figures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.data.localization_set import generate_set, read_set
from core.data.synth_rcm import make_rcm_mosaic
from core.heatmaps import get_method, list_methods
from core.heatmaps.mosaic import stitch_mosaic, window_probability_map
from core.metrics.localization import mask_labels, score_maps
from core.models import create_model, get_spec
from core.models.mlcam import ABLATIONS
from core.text import md_escape
from core.train import TrainConfig
from db import repo
from db.session import init_db, session_scope
from services.cli import main as cli
from services.localization import (
    MOSAIC_STUDIES,
    STUDIES,
    MapSpec,
    compute_maps,
    run_mosaic_study,
    run_study,
    train_on_set,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS_PAGE = str(ROOT / "pages" / "models.py")


def _signed_in(page: str, role: str) -> AppTest:
    """``page`` run once for a new user with ``role``."""
    init_db()
    with session_scope() as session:
        user_id = repo.create_user(session, f"{role}-{len(repo.list_users(session))}", "pw-long-enough-1", role).id
    at = AppTest.from_file(page, default_timeout=60)
    at.session_state["auth_user_id"] = user_id
    return at.run()


@pytest.fixture(scope="module")
def cle_set(tmp_path_factory: pytest.TempPathFactory):
    return generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=64, seed=3)


def test_a_cle_set_holds_images_labels_from_masks_and_both_mask_scales(cle_set):
    assert cle_set.modality == "CLE" and cle_set.channels == 1 and cle_set.mask_sets == ("intermediate", "restrictive")
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        x, y = cle_set.tensors(split)
        assert x.shape == (n, 1, 64, 64) and x.dtype == torch.float32
        intermediate = cle_set.masks(split, "intermediate")
        # seed 000's labelling: a frame is diagnostic when any diagnostic region is present
        assert np.array_equal(y.numpy().astype(bool), (intermediate == 255).any(axis=(1, 2)))
        assert 0 < y.sum() < n
    assert not list(cle_set.root.parent.glob("*.partial"))
    with pytest.raises(ValueError, match="already exists"):
        generate_set("cle", cle_set.root, counts=(2, 2, 2), size=64)
    with pytest.raises(ValueError, match="no 'tumor' masks"):
        cle_set.masks("test", "tumor")


def test_a_broken_set_is_refused_with_the_problem_named(tmp_path, cle_set):
    with pytest.raises(ValueError, match="dataset.json is missing"):
        read_set(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text((cle_set.root / "dataset.json").read_text())
    (broken / "labels.csv").write_text("image_id,split,label,path\na,train,1,images/a.png\nb,training,2,images/b.png\n")
    with pytest.raises(ValueError, match="line 3: split must be"):
        read_set(broken)
    (broken / "labels.csv").write_text("image_id,split,label,path\na,train,1,images/a.png\n")
    with pytest.raises(ValueError, match="missing, e.g. images/a.png"):
        read_set(broken)


def test_spectral_sets_are_standardised_by_training_tissue_statistics(tmp_path):
    data = generate_set("spectral", tmp_path / "ir", counts=(6, 2, 2), size=32, channels=16, seed=1)
    assert data.modality == "IR" and data.channels == 16 and data.mask_sets == ("tumor",)
    x, y = data.tensors("train")
    assert x.shape == (6, 16, 32, 32)
    tissue = torch.from_numpy(data.masks("train", "tumor") != 128)
    pixels = x.permute(1, 0, 2, 3)[:, tissue]
    assert torch.allclose(pixels.mean(dim=1), torch.zeros(16), atol=0.05)
    assert torch.allclose(pixels.std(dim=1), torch.ones(16), atol=0.05)
    assert np.array_equal(y.numpy().astype(bool), (data.masks("train", "tumor") == 255).any(axis=(1, 2)))


def test_training_on_a_set_registers_the_model_with_its_recipe_and_data(workspace, cle_set):
    config = TrainConfig(architecture="mlcam_lici", epochs=2, batch_size=8, lr=0.01, model_kwargs={"width": 8})
    info, model = train_on_set(config, cle_set, name="cle-mlcam", log=lambda _: None)
    assert (info.task, info.modality, info.image_size) == ("diagnostic", "CLE", 64)
    assert info.metrics["recipe"] == "mlcam" and 1 <= info.metrics["kept_epoch"] <= 2
    assert "val_loss" in info.metrics["history"][0] and info.metrics["test_n"] == 8
    assert info.config["dataset"]["kind"] == "cle" and info.config["model_kwargs"] == {"width": 8}
    with pytest.raises(ValueError, match="already registered"):
        train_on_set(config, cle_set, name="cle-mlcam", log=lambda _: None)
    with pytest.raises(ValueError, match="may only contain"):
        train_on_set(config, cle_set, name="a b", log=lambda _: None)


def test_maps_of_each_kind_are_what_the_model_and_method_give():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 64, 64)
    mlcam = create_model("mlcam_lici", in_chans=1, width=8).eval()
    for name, kwargs in ABLATIONS.items():
        expected, _ = mlcam.fdfm(x, **kwargs)
        got = compute_maps(mlcam, "mlcam_lici", MapSpec(name, "main", fdfm=name), x, batch=2)
        assert np.allclose(got, expected.detach().numpy(), atol=1e-6)
    resnet = create_model("resnet18", in_chans=1).eval()
    with get_method("gradcam")(resnet, get_spec("resnet18").layers(resnet)) as explainer:
        expected = explainer(x).maps
    assert np.allclose(compute_maps(resnet, "resnet18", MapSpec("g", "b", method="gradcam"), x), expected, atol=1e-5)
    unet = create_model("compsegnet", in_chans=1, base=4, depth=2).eval()
    got = compute_maps(unet, "compsegnet", MapSpec("s", "m", segment=True), x)
    assert np.allclose(got, unet.segment(x).detach().numpy(), atol=1e-6)  # the raw map: its threshold is absolute
    # each model's own map is offered for that model only
    assert "mlcam-lici" in list_methods(mlcam) and "compsegnet" not in list_methods(mlcam)
    assert "compsegnet" in list_methods(unet) and "mlcam-lici" not in list_methods(unet)


def _tiny(study: str) -> dict:
    """Small seed models and tiny_cnn in place of ResNet-18: plumbing, not performance."""
    small = {"width": 8} if study in ("mlcam", "celnet") else {"base": 8}
    return {
        key: {"model_kwargs": {**plan.model_kwargs, **small}} if key != "baseline" else {"architecture": "tiny_cnn"}
        for key, plan in STUDIES[study].models.items()
    }


@pytest.mark.parametrize("study", ["mlcam", "celnet", "compsegnet"])
def test_a_study_trains_scores_and_stores_its_table_with_examples(workspace, study):
    overrides = _tiny(study)
    if study == "celnet":
        for key, extra in (
            ("no_mam", {"attention": False}),
            ("cbam", {"attention": "cbam"}),
            ("no_ds", {"deep_supervision": False}),
        ):
            overrides[key] = {"model_kwargs": {"width": 8, **extra}}
    sizes = {"size": 32, "channels": 16} if study == "compsegnet" else {"size": 64}
    report = run_study(
        study, counts=(12, 6, 6), epochs=1, bootstrap=20, progress=None, log=lambda _: None, overrides=overrides,
        **sizes,
    )  # fmt: skip
    spec = STUDIES[study]
    assert set(report["models"]) == set(spec.models)
    assert [t["mask_set"] for t in report["tables"]] == [t.mask_set for t in spec.tables]
    for table, table_spec in zip(report["tables"], spec.tables, strict=True):
        assert [r["row"] for r in table["rows"]] == [r.label for r in table_spec.rows]
        for row in table["rows"]:
            assert row["threshold"] == table_spec.threshold
            for key in ("image_auc", "pixel_auc", "best_dice", "mean_acc", "mean_iu", "fw_iu"):
                assert row[key] is None or 0.0 <= row[key] <= 1.0
        assert table["examples"] and all((workspace / p).is_file() for p in table["examples"][0]["maps"].values())
    with session_scope() as session:
        main = repo.find_model(session, report["models"]["main"])
        stored = repo.model_evaluations(session, main.id)
    assert len(stored) == 1 and stored[0]["report"]["tables"][0]["rows"] == report["tables"][0]["rows"]
    assert stored[0]["dataset"]["kind"] == spec.kind


def test_a_stored_row_is_the_score_of_its_maps(workspace, cle_set):
    """Recompute one row of a stored table from the registered checkpoint: the stored figures are the maps' scores."""
    from core.models import load_checkpoint

    report = run_study(
        "mlcam", data_dir=cle_set.root, epochs=1, bootstrap=0, progress=None, log=lambda _: None,
        overrides=_tiny("mlcam"),
    )  # fmt: skip
    with session_scope() as session:
        info = repo.find_model(session, report["models"]["main"])
    model, _ = load_checkpoint(workspace / info.checkpoint_path, expected_sha256=info.checkpoint_sha256)
    x, y = cle_set.tensors("test")
    positive = y.numpy() == 1
    maps, _ = model.fdfm(x[positive], **ABLATIONS["M2 (LI+CI)"])
    masks = [mask_labels(m) for m in cle_set.masks("test", "restrictive")[positive]]
    expected = score_maps(list(maps.detach().numpy()), masks, threshold=0.2, bootstrap=0)
    table = next(t for t in report["tables"] if t["set"] == "Set3-R")
    assert table["split"] == "test" and table["mask_set"] == "restrictive"
    row = next(r for r in table["rows"] if r["row"] == "M2 (LI+CI)")
    assert row["pixel_auc"] == pytest.approx(expected["pixel_auc"]["estimate"], abs=1e-6)
    assert row["mean_iu"] == pytest.approx(expected["at_threshold"]["mean_iu"], abs=1e-6)


def test_cli_writes_a_set_trains_from_it_and_refuses_bad_input(workspace, tmp_path, capsys):
    out = tmp_path / "cli-set"
    assert cli(["synth", "cle", "--out", str(out), "--counts", "8", "4", "4", "--size", "64"]) == 0
    assert "train 8" in capsys.readouterr().out
    assert cli(["synth", "cle", "--out", str(out), "--counts", "8", "4", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    args = ["train", "--data", str(out), "--architecture", "celnet", "--epochs", "1", "--batch-size", "4"]
    assert cli([*args, "--name", "cli-celnet"]) == 0
    with session_scope() as session:
        info = repo.find_model(session, "cli-celnet")
    assert info.metrics["recipe"] == "celnet" and info.task == "diagnostic"
    assert cli(["train", "--data", str(tmp_path / "nothing"), "--architecture", "celnet"]) == 2
    assert "not a localisation data set" in capsys.readouterr().err


def test_cli_study_prints_the_table_and_writes_json(workspace, cle_set, tmp_path, capsys):
    out = tmp_path / "study.json"
    code = cli(
        ["localization-study", "celnet", "--data", str(cle_set.root), "--epochs", "1", "--bootstrap", "0",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "CELNet + CELM (ours)" in printed and "ResNet-18 + Backprop" in printed
    assert json.loads(out.read_text())["study"] == "celnet"


def test_models_page_shows_the_stored_table_and_example_maps(workspace, cle_set):
    run_study(
        "mlcam", data_dir=cle_set.root, epochs=1, bootstrap=0, progress=None, log=lambda _: None,
        overrides=_tiny("mlcam"),
    )  # fmt: skip
    at = _signed_in(MODELS_PAGE, "pi")
    assert not at.exception
    assert any(md_escape("seed 000, Table 2") in s.value for s in at.subheader)  # titles are shown as text
    tables = [d.value for d in at.dataframe if "Method" in d.value.columns]
    (classified,) = [d.value for d in at.dataframe if "Parameters" in d.value.columns]  # seed 001's Table 1 columns
    assert len(classified) == 6 and (classified["Parameters"] > 0).all()
    assert len(tables) == 5 and tables[0]["Method"].tolist()[:3] == ["M1 (MLGAP)", "M2 (LI+CI)", "M3 (no LI)"]
    shown = " ".join(m.value for m in at.markdown)
    assert "**Set1** (train split)" in shown and "**Set3\\-R** (test split)" in shown  # Set4: this set has none
    pictures = [h for h in at.get("html") if "data:image/png;base64," in h.proto.body]
    assert len(pictures) >= 3 and not at.get("imgs")  # image, mask and the maps of the first example, in the page
    refused = _signed_in(MODELS_PAGE, "reader")
    assert not any("Table 2" in s.value for s in refused.subheader)


def test_the_demo_gets_its_mlcam_table_once(workspace):
    from services.demo import DEMO_LOCALIZATION_PREFIX, DemoConfig, ensure_demo_localization

    config = DemoConfig(cle_counts=(12, 6, 6), cle_size=64, cle_epochs=1)
    ensure_demo_localization(config, log=lambda _: None)
    ensure_demo_localization(config, log=lambda _: None)  # an upgraded workspace is not trained twice
    with session_scope() as session:
        main = repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-main")
        assert main.architecture == "mlcam_lici"
        assert len(repo.model_evaluations(session, main.id)) == 1
        assert repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-baseline").architecture == "resnet18"


_TINY_RCM = {
    "main": {"architecture": "tiny_cnn", "model_kwargs": {}},
    "baseline": {"architecture": "tiny_cnn"},
    "context": {"architecture": "tiny_cnn", "model_kwargs": {}, "context": 8},  # tiny_cnn's stride is 8 px
}


def _rcm_study(**options):
    return run_mosaic_study(
        "rcm", counts=(2, 1, 2), size=160, window=40, patches=40, epochs=1, progress=None, log=lambda _: None,
        overrides=_TINY_RCM, **options,
    )  # fmt: skip


def test_the_rcm_study_stitches_every_row_over_held_out_mosaics_and_stores_the_table(workspace):
    from core.models import load_checkpoint

    report = _rcm_study(bootstrap=10, slow_step=20, prefix="rcm-test")
    spec = MOSAIC_STUDIES["rcm"]
    rows = report["tables"][0]["rows"]
    assert len(rows) == len(spec.rows) and len({r["row"] for r in rows}) == len(rows)
    # steps are fractions of the 40 px window; the Score-CAM row and its CAM twin take the slow step
    assert [r["step"] for r in rows] == [10, 10, 20, 20, 20, 10, 10, 10, 10, 10, 10]
    assert [r["mode"] for r in rows].count("fast") == 3 and "Score-CAM" in rows[4]["row"]
    # the whole trunk shared, for the plain network and for the one trained with context (services.mosaic)
    assert [(r["share"], r["context"]) for r in rows if r["mode"] == "fast"] == [(16, 0), (None, 0), (None, 8)]
    assert rows[8]["row"].endswith("fast, whole trunk") and "(trained with 8 px context)" in rows[10]["row"]
    assert "context" not in rows[8]["row"] and rows[9]["mode"] == "exact" and rows[9]["context"] == 8
    assert rows[0]["sigma"] is None and "no Gaussian" in rows[0]["row"]
    assert all(r["windows"] == ((160 - 40) // r["step"] + 1) ** 2 for r in rows)
    for row in rows:
        for key in ("image_auc", "pixel_auc", "best_dice", "mean_acc", "mean_iu", "fw_iu"):
            assert 0.0 <= row[key] <= 1.0
    with session_scope() as session:
        main = repo.find_model(session, report["models"]["main"])
        stored = repo.model_evaluations(session, main.id)
    assert main.task == "aspecific" and main.metrics["recipe"] == "flcnn"
    with session_scope() as session:
        context_model = repo.find_model(session, report["models"]["context"])
    assert context_model.config["context"] == 8 and "context" not in main.config
    assert len(stored) == 1 and stored[0]["report"]["tables"][0]["rows"] == rows
    seeds = stored[0]["dataset"]["mosaic_seeds"]
    assert not set(seeds["test"]) & set(seeds["train"] + seeds["val"])  # scored mosaics never trained on
    example = report["tables"][0]["examples"][0]
    assert example["image_id"] == f"mosaic-{seeds['test'][0]}"
    assert all((workspace / p).is_file() for p in (example["image"], example["mask"], *example["maps"].values()))

    # recompute two rows from the registered checkpoint and the seeds: the stored figures are the maps' scores
    model, _ = load_checkpoint(workspace / main.checkpoint_path, expected_sha256=main.checkpoint_sha256)
    test = [make_rcm_mosaic(160, 160, seed=seed) for seed in seeds["test"]]
    results = [stitch_mosaic(model, image, window=40, step=10, sigma=5.0, mode="exact") for image, _ in test]
    masks = [mask_labels(mask) for _, mask in test]
    for row, maps in (
        (rows[1], [r.map for r in results]),
        (rows[6], [window_probability_map(r, 160, 160) for r in results]),
    ):
        expected = score_maps(maps, masks, threshold=0.5, bootstrap=0)
        assert row["pixel_auc"] == pytest.approx(expected["pixel_auc"]["estimate"], abs=1e-6)
        assert row["best_dice"] == pytest.approx(expected["dice"]["dice"], abs=1e-6)

    with pytest.raises(ValueError, match="already registered"):
        _rcm_study(bootstrap=0, prefix="rcm-test")
    with pytest.raises(ValueError, match="does not fit"):
        run_mosaic_study("rcm", size=64, window=128)


def test_cli_rcm_study_and_its_refusals(workspace, monkeypatch, capsys):
    from dataclasses import replace

    spec = MOSAIC_STUDIES["rcm"]
    tiny = {key: replace(plan, **_TINY_RCM[key]) for key, plan in spec.models.items()}
    monkeypatch.setitem(MOSAIC_STUDIES, "rcm", replace(spec, models=tiny))
    args = ["--counts", "2", "1", "1", "--size", "128", "--window", "32", "--patches", "32", "--epochs", "1"]
    assert cli(["localization-study", "rcm", *args, "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "tiny CNN + Score-CAM, step 32" in printed and "window probability (no CAM)" in printed
    assert cli(["localization-study", "rcm", "--data", str(workspace)]) == 2
    assert "--data, --channels and --models do not apply" in capsys.readouterr().err
    assert cli(["localization-study", "mlcam", "--window", "64"]) == 2
    assert "mosaic studies only (rcm, rcm-grid)" in capsys.readouterr().err
    at = _signed_in(MODELS_PAGE, "pi")
    assert not at.exception
    assert any(md_escape("seed 002, Table 2") in s.value for s in at.subheader)
    table = next(d.value for d in at.dataframe if "Method" in d.value.columns)
    assert "Windows / mosaic" in table.columns and len(table) == len(spec.rows)


def test_diagnose_takes_cle_frames_with_the_cle_models_own_map_and_keeps_spectral_models_off(
    workspace, cle_set, tmp_path
):
    """A CLE model trained on a set diagnoses uploaded frames with its own map; a spectral (IR) model, which has
    no upload path, is listed as such instead of breaking the page."""
    from services.diagnose import diagnose_files, load_predictor

    config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
    cle, _ = train_on_set(config, cle_set, name="cle-diag", log=lambda _: None)
    spectral = generate_set("spectral", tmp_path / "ir", counts=(4, 2, 2), size=32, channels=16, seed=1)
    ir_config = TrainConfig(architecture="compsegnet", epochs=1, batch_size=4, model_kwargs={"base": 8})
    train_on_set(ir_config, spectral, name="ir-spots", log=lambda _: None)
    predictor = load_predictor(cle)
    assert "mlcam-lici" in predictor.methods
    frame = cle_set.root / cle_set.rows("test")["path"].iloc[0]
    (outcome,) = diagnose_files(predictor, cle, [(frame.name, frame.read_bytes())], user_id=None, heatmap="mlcam-lici")
    assert outcome.error is None and 0.0 <= outcome.probability <= 1.0 and outcome.heatmap
    at = _signed_in(str(ROOT / "pages" / "diagnose.py"), "pi")
    assert not at.exception
    assert at.radio(key="diagnose_modality").options == ["CLE"]
    assert any(md_escape("ir-spots") in c.value for c in at.caption)
