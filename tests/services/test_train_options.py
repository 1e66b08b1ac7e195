"""Training options from the CLI and the jobs: weight decay, dropout and builder options, the task's threshold rule,
and a localisation study's per-model recipe overrides; each refused with a clear message before anything trains."""

from __future__ import annotations

import re

import pytest
import torch

from core.models import check_model_options, load_checkpoint, model_options
from core.settings import workspace_dir
from core.train import TrainConfig, default_policy, fit, recipe_for
from db import repo
from db.session import init_db, session_scope
from services.cli import main
from services.jobs.kinds import check_params
from services.localization import STUDIES, check_overrides


def test_grade_and_ki67_default_to_the_closest_rule_and_tumor_to_sens90():
    assert default_policy("tumor") == "sens90"
    assert default_policy("grade") == default_policy("ki67") == "closest"
    generator = torch.Generator().manual_seed(0)
    y = (torch.arange(48) % 2).float()
    x = torch.randn(48, 1, 32, 32, generator=generator) * 0.3
    x[y == 1, :, 8:24, 8:24] += 1.0
    for task, expected in (("ki67", "closest"), ("tumor", "sens90")):
        config = TrainConfig(architecture="tiny_cnn", task=task, image_size=32, epochs=1, batch_size=16)
        assert fit(config, x[:32], y[:32], x[32:], y[32:]).threshold_policy == expected
    asked = TrainConfig(architecture="tiny_cnn", task="grade", threshold_policy="youden", image_size=32, epochs=1)
    assert fit(asked, x[:32], y[:32], x[32:], y[32:]).threshold_policy == "youden"


@pytest.mark.parametrize(
    ("architecture", "own"), [("resnet18", 1e-4), ("mlcam_lici", 1e-4), ("celnet", 1e-5), ("compsegnet", 0.0)]
)
def test_weight_decay_is_the_recipes_own_unless_asked(architecture, own):
    layer = torch.nn.Linear(2, 1)
    default = TrainConfig(architecture=architecture)
    assert recipe_for(default).optimizer(layer, default).param_groups[0]["weight_decay"] == own
    asked = TrainConfig(architecture=architecture, weight_decay=5e-4)
    assert recipe_for(asked).optimizer(layer, asked).param_groups[0]["weight_decay"] == 5e-4


def test_builder_options_are_checked_against_the_architecture():
    assert model_options("efficientnet_b0") == {"drop_rate": 0.5, "output_stride": 32, "pool": "avg"}
    assert model_options("flmil") == {"width": 32, "top_k": 0.1, "drop_rate": 0.1, "tissue": True, "stem_stride": 2}
    assert check_model_options("resnet18", {"drop_rate": 0.75}) == {"drop_rate": 0.75}
    assert check_model_options("celnet", {"attention": "cbam", "width": 8}) == {"attention": "cbam", "width": 8}
    for architecture, options, message in (
        ("tiny_cnn", {"drop_rate": 0.5}, "no option 'drop_rate'; its options: width"),
        ("resnet18", {"drop_rate": 1.0}, r"must lie in \[0, 1\)"),
        ("resnet18", {"drop_rate": "high"}, "must be float"),
        ("tiny_cnn", {"width": 8.5}, "must be int"),
        ("tiny_cnn", {"width": True}, "must be int"),
        ("flmil", {"top_k": "most"}, "must be float"),
    ):
        with pytest.raises(ValueError, match=message):
            check_model_options(architecture, options)


def test_cli_train_takes_weight_decay_dropout_and_builder_options(cohort_workspace):
    common = ["train", "--modality", "FL", "--epochs", "1", "--image-size", "32", "--batch-size", "8"]
    assert main([*common, "--architecture", "tiny_cnn", "--model-option", "width=8", "--weight-decay", "5e-4",
                 "--name", "narrow"]) == 0  # fmt: skip
    assert main([*common, "--architecture", "resnet18", "--dropout", "0.75", "--name", "dropped"]) == 0
    with session_scope() as session:
        narrow, dropped = repo.find_model(session, "narrow"), repo.find_model(session, "dropped")
    assert narrow.metrics["weight_decay"] == 5e-4 and narrow.threshold_policy == "sens90"
    model, config = load_checkpoint(workspace_dir() / narrow.checkpoint_path, narrow.checkpoint_sha256)
    assert config["model_kwargs"] == {"width": 8} and config["weight_decay"] == 5e-4
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in load_checkpoint(workspace_dir() / dropped.checkpoint_path)[0].parameters()
    )
    assert dropped.metrics["weight_decay"] == 1e-4  # the FL-CNN recipe's own
    model, config = load_checkpoint(workspace_dir() / dropped.checkpoint_path)
    assert config["model_kwargs"] == {"drop_rate": 0.75} and model.drop_rate == 0.75


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--architecture", "tiny_cnn", "--dropout", "0.5"], "tiny_cnn has no option 'drop_rate'"),
        (["--model-option", "width"], "--model-option takes KEY=VALUE"),
        (["--dropout", "0.5", "--model-option", "drop_rate=0.6"], "not both"),
        (["--weight-decay", "2"], r"--weight-decay must lie in \[0, 1\)"),
    ],
)
def test_cli_train_refuses_bad_options_before_training(workspace, extra, message, capsys):
    assert main(["train", "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)
    init_db()
    with session_scope() as session:
        assert repo.list_models(session) == []


def test_train_jobs_carry_checked_builder_options_and_weight_decay(cohort_workspace):
    _, complete = check_params(
        "train", {"architecture": "resnet18", "model_kwargs": {"drop_rate": 0.75}, "weight_decay": 5e-4}
    )
    assert complete["model_kwargs"] == {"drop_rate": 0.75} and complete["weight_decay"] == 5e-4
    assert complete["threshold_policy"] is None  # the task's rule, decided when training ends
    for params, message in (
        ({"architecture": "tiny_cnn", "model_kwargs": {"drop_rate": 0.5}}, "no option 'drop_rate'"),
        ({"architecture": "resnet18", "model_kwargs": ["drop_rate"]}, "JSON object"),
        ({"architecture": "resnet18", "weight_decay": "a lot"}, "weight decay must be a number"),
        ({"architecture": "resnet18", "threshold_policy": "fixed"}, "unknown threshold policy"),
    ):
        with pytest.raises(ValueError, match=message):
            check_params("train", params)


def test_study_overrides_are_checked_and_builder_options_join_the_plans():
    checked = check_overrides("celnet", {"main": {"lr": 0.05, "width": 8}, "baseline": {"drop_rate": 0.75}})
    assert checked["main"] == {
        "lr": 0.05,
        "model_kwargs": {**STUDIES["celnet"].models["main"].model_kwargs, "width": 8},
    }
    assert checked["baseline"] == {"model_kwargs": {"drop_rate": 0.75}}
    no_mam = check_overrides("celnet", {"no_mam": {"weight_decay": 5e-4, "augment": True}})["no_mam"]
    assert no_mam == {"weight_decay": 5e-4, "augment": True}
    assert check_overrides("rcm", {"main": {"drop_rate": 0.75}})["main"]["model_kwargs"]["drop_rate"] == 0.75
    for overrides, message in (
        ({"nope": {"lr": 0.1}}, "trains no model 'nope'; its models: main"),
        ({"main": {"architecture": "resnet18"}}, "main.architecture cannot be overridden"),
        ({"main": {"lr": 0}}, r"main.lr must be a number in \(0, 1\)"),
        ({"main": {"epochs": 2.5}}, "main.epochs must be a whole number"),
        ({"main": {"recipe": "sgd"}}, "main.recipe must be one of"),
        ({"baseline": {"width": 8}}, "baseline.width cannot be overridden"),
    ):
        with pytest.raises(ValueError, match=message):
            check_overrides("mlcam", overrides)


def test_localization_study_cli_and_job_refuse_bad_overrides_before_training(workspace, capsys):
    assert main(["localization-study", "mlcam", "--set", "main.momentum=0.5"]) == 2
    assert "main.momentum cannot be overridden" in capsys.readouterr().err
    assert main(["localization-study", "mlcam", "--set", "lr=0.5"]) == 2
    assert "--set takes MODEL.FIELD=VALUE" in capsys.readouterr().err
    assert not (workspace / "datasets").exists()
    _, complete = check_params("localization-study", {"study": "mlcam", "overrides": {"main": {"lr": 0.05}}})
    assert complete["overrides"] == {"main": {"lr": 0.05}}
    with pytest.raises(ValueError, match="overrides must map a model"):
        check_params("localization-study", {"study": "mlcam", "overrides": {"main": 0.05}})


def test_localization_study_cli_passes_its_overrides_to_the_study(workspace, monkeypatch):
    import services.localization as localization

    seen = {}

    def fake_study(study, **kwargs):
        seen.update(kwargs, study=study)
        return {"title": study, "tables": [], "models": {"main": "m"}, "evaluation_id": 1}

    monkeypatch.setattr(localization, "run_study", fake_study)
    argv = ["localization-study", "celnet", "--set", "main.lr=0.05", "--set", "main.augment=true", "--set",
            "baseline.drop_rate=0.75"]  # fmt: skip
    assert main(argv) == 0
    assert seen["study"] == "celnet"
    plans = STUDIES["celnet"].models  # checked: a builder option joins the plan's own options
    assert seen["overrides"] == {
        "main": {"lr": 0.05, "augment": True},
        "baseline": {"model_kwargs": {**plans["baseline"].model_kwargs, "drop_rate": 0.75}},
    }
    assert seen["models"] is None
    assert main(["localization-study", "celnet", "--models", "baseline"]) == 0 and seen["models"] == ["baseline"]
    assert main(["localization-study", "rcm", "--models", "baseline"]) == 2


def test_localization_study_cli_prints_each_tables_own_columns_and_table_1(workspace, monkeypatch, capsys):
    import services.localization as localization

    row = {"row": "CompSegNet activation map", "image_auc": 0.9, "pixel_auc": 0.8, "dice_spot_mean": 0.84}
    report = {
        "title": "t",
        "models": {"main": "m"},
        "evaluation_id": 1,
        "tables": [
            {"mask_set": "tumor", "threshold": 0.35, "rows": [row]},
            {"mask_set": "intermediate", "threshold": 0.03, "set": "Set4", "split": "mislabelled", "rows": [
                {"row": "M2 (LI+CI)", "pixel_auc": 0.7}]},
        ],
        "classification": [{"name": "m", "test_accuracy": 0.9, "test_auc": 0.95, "parameters": 296103}],
    }  # fmt: skip
    monkeypatch.setattr(localization, "run_study", lambda study, **kwargs: report)
    assert main(["localization-study", "compsegnet"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("Set4 (mislabelled), intermediate masks")
    assert "DiceSp" in first and "0.840" in first and "DiceSp" not in second  # only where rows have it
    assert "  -  " in second.splitlines()[2]  # a figure the row lacks is a dash, never an error
    assert "accuracy 0.900  AUC 0.950     296,103 parameters" in out
