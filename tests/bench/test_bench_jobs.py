"""The job engine benchmark's latency and mosaic parts run end to end on a real Ray cluster at the smallest sizes, and
every job they submit succeeds (timings are not judged here)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.jobs import latency, mosaic_jobs, report_tables
from services.jobs import engine


@pytest.fixture
def on_cluster(ray_cluster: str, workspace: Path) -> Iterator[Path]:
    """A fresh workspace attached to the session's cluster; its supervisor is removed after."""
    yield workspace
    engine.stop_supervisor()


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def test_latency_and_mosaic_parts_report_every_job_and_every_job_succeeds(on_cluster: Path) -> None:
    timing = latency(2)
    assert timing["all_succeeded"], [(row["state"], row["error"]) for row in timing["rows"]]
    assert [row["phase"] for row in timing["rows"]] == ["cold", "warm"]
    assert timing["cluster_cpus"] >= 1 and timing["cohort"]["images"] > 0
    for row in timing["rows"]:
        figures = ("submit_s", "queued_to_running_s", "running_to_finished_s", "queued_to_finished_s")
        assert all(_positive(row[key]) for key in figures), row
        assert row["queued_to_finished_s"] == pytest.approx(row["queued_to_running_s"] + row["running_to_finished_s"])
    for phase in ("cold", "warm"):
        for spread in timing["summary"][phase].values():
            assert spread["max"] >= spread["median"] >= 0

    mosaics = mosaic_jobs(2, size=128, window=32, step=32, mode="exact", rounds=1)
    assert mosaics["all_succeeded"], (mosaics["jobs_cold"]["errors"], mosaics["jobs_warm"][0]["errors"])
    assert mosaics["count"] == 2 and mosaics["windows"] == 16  # (128 - 32) / 32 + 1 = 4 windows a side
    assert len(mosaics["in_process"]) == 2 and len(mosaics["jobs_warm"]) == 1  # a, cold b, then warm b and a
    for jobs in (mosaics["jobs_cold"], *mosaics["jobs_warm"]):
        assert jobs["states"] == ["succeeded", "succeeded"] and not jobs["errors"]
        assert 1 <= jobs["most_at_once"] <= 2 and all(jobs["workers"])
        assert all(0.0 <= p <= 1.0 for p in jobs["probabilities"])
    # the same model on the same mosaic: a job's probability is the in-process one (up to thread-count rounding)
    assert mosaics["probability_max_abs_diff"] < 1e-4
    assert set(mosaics["ratios"]) == {
        "jobs_cold_over_in_process",
        "jobs_warm_over_in_process",
        "jobs_warm_over_jobs_cold",
    }
    assert all(_positive(ratio) for ratio in mosaics["ratios"].values())
    assert [run["all_succeeded"] for run in mosaics["in_process"]] == [True, True]

    table = report_tables({"latency": timing, "mosaics": mosaics, "first_start": None})
    assert "queued -> running" in table and "(b) jobs at once, warm workers" in table
