"""The clip benchmark runs end to end at its smallest size: every measurement timed, the whole clip decoded and
triaged, and the batched triage's probabilities equal to one frame at a time (timings are not judged here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.clips import main


def test_quick_run_measures_every_part_and_batching_changes_no_probability(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "clips-cpu-quick.json").read_text())
    (part,) = document["sizes"]
    assert (part["size"], part["frames"], part["decoded"]) == (128, 24, 24)
    assert set(part["rows"]) == {"decode", "single", "triage", "triage_maps"}
    for row in part["rows"].values():
        assert row["rounds"] == 1 and math.isfinite(row["frames_per_s"]) and row["frames_per_s"] > 0
        assert row["x_probe"] == row["frames_per_s"] / 20.0
    assert 1 <= len(part["top_frames"]) <= 2  # half a second apart in a 1.2 s clip
    assert part["batched_vs_single_max_abs_diff"] < 1e-4
    assert all(ratio > 0 for ratio in part["ratios"].values())
