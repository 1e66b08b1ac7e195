"""The live benchmark runs end to end at its smallest size: every model without and with its own map, every frame
accounted for as shown or dropped, the JSON as the table (timings are not judged here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.live import main


def test_quick_run_replays_every_model_without_and_with_its_map(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "live-cpu-quick.json").read_text())
    rows = document["rows"]
    assert [(r["model"], r["size"], r["heatmap"]) for r in rows] == [
        ("efficientnet_b0", 64, None),
        ("efficientnet_b0", 64, "gradcam"),
        ("mlcam_lici", 64, None),
        ("mlcam_lici", 64, "mlcam-lici"),
    ]
    for row in rows:
        assert row["frames"] == row["arrived"] == 10 and row["fps"] == 20.0
        assert 1 <= row["shown"] <= 10 and row["shown"] + row["dropped"] == 10
        assert row["achieved_fps"] == 20.0 * row["shown"] / 10
        assert 0 <= row["latency_p50_ms"] <= row["latency_p95_ms"] and math.isfinite(row["score_ms"])
        assert row["keeps_up"] == (row["dropped"] == 0 and row["latency_p95_ms"] <= 50.0 + 1e-6)
