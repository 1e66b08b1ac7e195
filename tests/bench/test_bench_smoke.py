"""The diagnosis benchmark runs end to end on the CPU and writes every figure (timings are not judged here)."""

import math
from pathlib import Path

from bench.diagnosis import MEASUREMENTS, main
from tests.bench import run_quick


def test_quick_run_writes_every_measurement_with_positive_finite_figures(tmp_path: Path):
    document = run_quick(main, tmp_path, "diagnosis")
    assert document["machine"]["device"] == "cpu" and document["machine"]["threads"] == 1
    rows = document["rows"]
    assert sorted(row["measurement"] for row in rows) == sorted(MEASUREMENTS)
    assert {row["size"] for row in rows} == {64}
    for row in rows:
        figures = [row[key] for key in ("median_ms", "p90_ms", "images_per_s", "x_floor")]
        assert all(math.isfinite(value) and value > 0 for value in figures), row
        assert row["p90_ms"] >= row["median_ms"] and row["repeats"] == 2
        assert isinstance(row["page_faults"], int) and row["page_faults"] >= 0
    floors = [row for row in rows if row["measurement"] in ("floor", "floor_batch")]
    assert [row["x_floor"] for row in floors] == [1.0, 1.0]
    assert {row["measurement"]: row["batch"] for row in rows}["diagnose_gradcam_batch"] == 2
