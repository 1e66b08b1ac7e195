"""The ``compare-models`` job kind (seed 003's Table 2 / Fig. 4 from the Models page): every refusal before a job is
queued says what to change, and a job run in-process stores the same report ``compare_models`` computes, as an
evaluation of model A that the page lists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from db import repo
from services.jobs import kinds, store
from services.jobs.kinds import check_params
from services.jobs.runner import execute
from services.model_compare import compare_models, is_comparison, stored_comparisons

SMALL = {"bootstrap": 100, "permutations": 200, "seed": 3}


@pytest.fixture
def compare_ws(cascade_copy: Path) -> Path:
    """Jobs and stored comparisons land in a private copy of the cascade workspace, not in the shared one."""
    return cascade_copy


def test_a_comparison_is_checked_and_completed_with_the_papers_defaults(compare_ws):
    title, params = check_params("compare-models", {"model_a": "casc-FL-grade", "model_b": "casc-WL-grade"})
    assert params == {
        "model_a": "casc-FL-grade",
        "model_b": "casc-WL-grade",
        "split": "test",
        "bootstrap": 1000,
        "permutations": 10_000,
        "seed": 0,
    }
    assert title == "Compare casc-FL-grade with casc-WL-grade (grade, test split)"
    model_id = repo.find_model("casc-WL-ki67").id  # a model named by its id is stored by its name
    _, params = check_params("compare-models", {"model_a": "casc-FL-ki67", "model_b": str(model_id), "split": "val"})
    assert (params["model_b"], params["split"]) == ("casc-WL-ki67", "val")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"model_b": "casc-WL-grade"}, "choose two registered models of one task"),
        ({"model_a": "casc-FL-grade", "model_b": "no-such"}, "no registered model 'no-such'; see the Models page"),
        ({"model_a": "casc-FL-grade", "model_b": "casc-FL-grade"}, "compare casc-FL-grade with, not casc-FL-grade"),
        (
            {"model_a": "casc-FL-grade", "model_b": "casc-WL-tumor"},
            "casc-FL-grade is a grade model and casc-WL-tumor a tumor model; choose two models of the same task",
        ),
        ({"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", "split": "all"}, "unknown split 'all'; choose one"),
        ({"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", "bootstrap": 5}, "bootstrap must be between 100"),
        (
            {"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", "permutations": 10**7},
            "permutations must be between 100 and 100000",
        ),
        ({"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", "seed": "x"}, "seed must be a whole number"),
        ({"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", "resamples": 9}, r"unknown comparison parameter"),
    ],
)
def test_a_bad_comparison_is_refused_with_what_to_change(compare_ws, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_params("compare-models", params)


def test_a_comparison_of_localisation_set_tasks_is_refused(compare_ws, monkeypatch):
    real = kinds._model

    def as_diagnostic(name_or_id, **kw):
        return dataclasses.replace(real(name_or_id, **kw), task="diagnostic")

    monkeypatch.setattr(kinds, "_model", as_diagnostic)
    with pytest.raises(ValueError, match="diagnostic models learn from pixel labels.*choose two tumor, grade, ki67"):
        check_params("compare-models", {"model_a": "casc-FL-grade", "model_b": "casc-WL-grade"})


def test_the_job_stores_the_report_compare_models_computes(compare_ws):
    title, params = check_params("compare-models", {"model_a": "casc-FL-grade", "model_b": "casc-WL-grade", **SMALL})
    job_id = store.create_job("compare-models", title, params, user_id=None)
    assert execute(job_id) == "succeeded", store.get_job(job_id).error
    job = store.get_job(job_id)
    (stored,) = stored_comparisons()
    assert job.result["evaluation_id"] == stored["id"] and job.result["evaluations"] == [stored["id"]]
    assert "specimens (" in job.log_tail and f"stored as evaluation {stored['id']}" in job.log_tail
    model_a = repo.find_model("casc-FL-grade")
    assert [e["id"] for e in repo.model_evaluations(model_a.id) if is_comparison(e)] == [stored["id"]]
    assert stored["dataset"]["model_b"] == "casc-WL-grade" and stored["dataset"]["split"] == "test"
    expected = compare_models("casc-FL-grade", "casc-WL-grade", resamples=100, permutations=200, seed=3)
    report = stored["report"]
    assert report["metrics"] == expected["metrics"] and report["n_cases"] == expected["n_cases"] > 0
    assert (report["resamples"], report["permutations"], report["seed"]) == (100, 200, 3)
    assert stored["title"] == "casc-FL-grade vs casc-WL-grade: grade on the test split"
