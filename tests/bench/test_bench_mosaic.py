"""The mosaic benchmark runs end to end on the CPU and writes every figure (timings are not judged here)."""

import math
from pathlib import Path

from bench.mosaic import main
from tests.bench import run_quick

FAST = ("fast", "fast, whole trunk", "fast, whole trunk, phases=2")


def test_quick_run_writes_speed_accuracy_and_memory(tmp_path: Path):
    document = run_quick(main, tmp_path, "mosaic")
    assert document["machine"]["device"] == "cpu" and document["machine"]["threads"] == 1

    speed = document["speed"]
    rows = {row["mode"]: row for row in speed["rows"]}
    assert sorted(rows) == sorted((*FAST, "exact", "loop"))
    for mode in FAST:
        assert not rows[mode]["extrapolated"] and rows[mode]["windows_timed"] == speed["windows"]
        assert speed["speedup"][mode]["vs_loop"] > 0 and speed["speedup"][mode]["vs_exact"] > 0
    for mode in ("exact", "loop"):
        assert rows[mode]["extrapolated"] and rows[mode]["windows_timed"] == speed["block_windows"] == 4
        assert rows[mode]["seconds"] == rows[mode]["measured_seconds"] * speed["windows"] / 4
    for row in rows.values():
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("seconds", "measured_seconds")), row
    assert speed["block_exact_vs_loop"]["max_abs"] < 1e-4  # both exact: the same maps
    assert set(speed["block_vs_exact"]) == set(speed["tile_seams"]) == {"fast", "fast, whole trunk"}

    accuracy = document["accuracy"]
    assert accuracy["architecture"] == "tiny_cnn"
    pairs = [(row["sigma"], row["phases"]) for row in accuracy["rows"]]
    assert len(pairs) == 4 and set(pairs) == {(None, 1), (5.0, 1), (5.0, 2), (5.0, 4)}
    for row in accuracy["rows"]:
        assert 0.0 <= row["auc_fast"] <= 1.0 and 0.0 <= row["auc_exact"] <= 1.0
        assert 0.0 <= row["mean_abs"] <= row["max_abs"] <= 1.0
    assert document["b2"] is None  # only with --b2

    (memory,) = document["memory"]
    assert memory["size"] == document["settings"]["size"] and memory["seconds"] > 0
    assert memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0
