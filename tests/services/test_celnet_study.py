"""Seed 001's studies end to end on tiny settings: the ``celnet`` table with Table 1 (accuracy, AUC, parameters) and
CELM's fusion weights chosen on val and stored with each CELNet; the ``celnet-slides`` study (Table 2: slide AUC and
FROC on synthetic slides) from the CLI. Plumbing, not performance: one epoch on a dozen 32-64 px frames."""

from __future__ import annotations

import pytest

from core.heatmaps.celm import WEIGHT_GRID
from core.models import create_model, load_checkpoint
from db import repo
from db.session import session_scope
from services.cli import main as cli
from services.jobs.kinds import _check_localization
from services.localization import STUDIES, run_study, study_titles
from services.slides import SLIDE_STUDIES

CELNETS = {
    "main": {},
    "no_mam": {"attention": False},
    "cbam": {"attention": "cbam"},
    "no_ds": {"deep_supervision": False},
}


def test_the_celnet_study_stores_table_1_and_the_celm_weights_chosen_on_val(workspace):
    overrides = {key: {"model_kwargs": {"width": 4, **options}} for key, options in CELNETS.items()}
    report = run_study(
        "celnet", counts=(12, 6, 6), size=32, epochs=1, bootstrap=0, progress=None, log=lambda _: None,
        overrides=overrides,
    )  # fmt: skip
    classification = {row["model"]: row for row in report["classification"]}
    assert set(classification) == set(STUDIES["celnet"].models)
    for key, row in classification.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["name"] == report["models"][key]
        assert 0.0 <= row["test_auc"] <= 1.0
    for key, options in CELNETS.items():
        built = create_model("celnet", in_chans=1, width=4, **options)
        assert classification[key]["parameters"] == sum(p.numel() for p in built.parameters())
    assert classification["baseline"]["parameters"] == sum(
        p.numel() for p in create_model("resnet18", in_chans=1).parameters()
    )
    assert set(report["celm_weights"]) == set(CELNETS)
    with session_scope() as session:
        infos = {key: repo.find_model(session, name) for key, name in report["models"].items()}
        stored = repo.model_evaluations(session, infos["main"].id)[0]["report"]
    assert stored["classification"] == report["classification"]
    for key, search in report["celm_weights"].items():
        assert search["alpha"] in WEIGHT_GRID and search["beta"] in WEIGHT_GRID and len(search["grid"]) == 25
        best = max(point["score"] for point in search["grid"] if point["score"] is not None)
        chosen = next(p for p in search["grid"] if (p["alpha"], p["beta"]) == (search["alpha"], search["beta"]))
        assert chosen["score"] == pytest.approx(best)
        kwargs = infos[key].config["model_kwargs"]
        assert (kwargs["celm_alpha"], kwargs["celm_beta"]) == (search["alpha"], search["beta"])
        model, _ = load_checkpoint(workspace / infos[key].checkpoint_path, infos[key].checkpoint_sha256)
        assert (model.celm_alpha, model.celm_beta) == (search["alpha"], search["beta"])
    assert all(info.metrics["recipe"] == "celnet" for info in infos.values())  # the paper trains every model so
    assert all(info.config["augment"] for info in infos.values())
    backprop = report["tables"][0]["rows"][-1]
    assert backprop["row"] == "ResNet-18 + Backprop" and backprop["map"] == "Backprop (plain gradient)"


def test_the_slide_study_is_listed_and_runs_from_the_cli(workspace, tmp_path, capsys):
    assert "celnet-slides" in study_titles() and "celnet-slides" in SLIDE_STUDIES
    assert _check_localization({"study": "celnet-slides"})[1]["study"] == "celnet-slides"
    out = tmp_path / "slides.json"
    args = ["localization-study", "celnet-slides", "--counts", "8", "4", "2", "--size", "128", "--epochs", "1"]
    assert cli([*args, "--data", str(tmp_path / "frames"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 2" in printed and "slides masks" in printed
    with session_scope() as session:
        evaluations = [e for m in repo.list_models(session) for e in repo.model_evaluations(session, m.id)]
    (evaluation,) = evaluations
    report = evaluation["report"]
    assert evaluation["dataset"]["splits"]["test"] == {"images": 2, "positive": 1}
    rows = report["tables"][0]["rows"]
    assert [row["architecture"] for row in rows] == ["celnet", "resnet18"]
    for row in rows:
        assert row["slide_auc"] == row["image_auc"] and row["slide_auc"] in (0.0, 0.5, 1.0)
        sensitivities = [row[f"sensitivity_at_{rate:g}_fp"] for rate in report["fp_rates"]]
        assert row["froc"] == pytest.approx(sum(sensitivities) / 6)
        assert all(0.0 <= s <= 1.0 for s in sensitivities) and sensitivities == sorted(sensitivities)
        assert row["regions"] >= 1
    assert {row["model"] for row in report["classification"]} == {"main", "baseline"}
    examples = report["tables"][0]["examples"]
    assert len(examples) == 2 and all((workspace / p).is_file() for e in examples for p in e["maps"].values())
