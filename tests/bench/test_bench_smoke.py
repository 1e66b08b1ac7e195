"""The diagnosis benchmark runs end to end on the CPU and writes every figure (timings are not judged here)."""

import json
import math
from pathlib import Path

import torch

from bench.diagnosis import MEASUREMENTS, main


def test_quick_run_writes_every_measurement_with_positive_finite_figures(tmp_path: Path):
    # One thread: a smoke test on a busy CI machine would otherwise wait at thread barriers (see bench/README.md).
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads((tmp_path / "diagnosis-cpu-quick.json").read_text())
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
