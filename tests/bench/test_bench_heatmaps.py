"""The heatmap benchmark runs end to end on the CPU, compares like with like, and writes every figure (timings are
not judged here)."""

import math
import platform
import sys

import pytest
import torch

from tests.bench import run_quick

pytest.importorskip("pytorch_grad_cam")
from bench.heatmaps import CLE_FPS, EQUAL_MAPS, PEER, main  # noqa: E402


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    return run_quick(main, out, "heatmaps")


def test_the_machine_and_the_calibrated_logits_are_recorded(document):
    assert document["machine"]["device"] == "cpu" and document["machine"]["threads"] == 1
    for logits in document["calibration_logits"].values():
        assert max(abs(v) for v in logits["random_init"]) < 0.1  # what random weights give
        spread = torch.tensor(logits["head_rescaled"]).std().item()
        assert 1.0 < spread < 10.0  # a trained classifier's spread of several units


def test_peer_rows_cover_every_implementation_with_equal_maps(document):
    rows = document["peer"]
    seen = {(r["method"], r["implementation"], r["memory_format"], r["scorecam_batch"]) for r in rows}
    assert seen == {
        ("gradcam", "ours", "contiguous", None),
        ("gradcam", "ours", "channels_last", None),
        ("gradcam", PEER, "contiguous", None),
        ("scorecam", "ours", "contiguous", None),
        ("scorecam", "ours", "channels_last", None),
        ("scorecam", "ours", "channels_last", 64),
        ("scorecam", PEER, "contiguous", 16),
    }
    assert {r["architecture"] for r in rows if r["method"] == "gradcam"} == {"efficientnet_b0"}
    assert {r["architecture"] for r in rows if r["method"] == "scorecam"} == {"tiny_cnn"}
    assert {(r["method"], r["images"]) for r in rows} == {("gradcam", 2), ("scorecam", 1)}
    for row in rows:
        figures = [row[key] for key in ("median_s", "p90_s", "s_per_image", "images_per_s", "x_peer")]
        assert all(math.isfinite(value) and value > 0 for value in figures), row
        assert row["p90_s"] >= row["median_s"] and row["repeats"] == 2 and row["size"] == 64
        assert row["images_per_s"] == pytest.approx(row["images"] / row["median_s"])
        assert row["max_abs_diff"] < EQUAL_MAPS and row["equal_maps"] is True, row
        if row["implementation"] == PEER:
            assert row["x_peer"] == 1.0 and row["max_abs_diff"] == 0.0


def test_cle_rows_give_frame_rates_for_every_heatmap_batch_and_allocator(document):
    rows = document["cle"]
    assert sorted((r["heatmap"] or "", r["batch"], r["allocator"], r["thread"]) for r in rows) == [
        (heatmap, batch, allocator, "main")
        for heatmap in ("", "cam", "gradcam")
        for batch in (1, 2)
        for allocator in ("default", "tuned")
    ]
    assert len({r["memory_format"] for r in rows}) == 1  # the predictor's one model
    assert rows[0]["memory_format"] in ("contiguous", "channels_last")
    rate = {(r["heatmap"], r["batch"], r["allocator"]): r["frames_per_s"] for r in rows}
    for row in rows:
        assert row["size"] == 64 and row["repeats"] == 2
        assert row["frames_per_s"] == pytest.approx(row["batch"] * 1000.0 / row["median_ms"])
        assert row["x_realtime"] == pytest.approx(row["frames_per_s"] / CLE_FPS)
        single = rate[row["heatmap"], 1, row["allocator"]]
        assert row["x_single"] == pytest.approx(row["frames_per_s"] / single)
        assert row["x_default"] == pytest.approx(row["frames_per_s"] / rate[row["heatmap"], row["batch"], "default"])
        assert row["p90_ms"] >= row["median_ms"] > 0
        assert isinstance(row["page_faults"], int) and row["page_faults"] >= 0
        assert row["peak_rss_mb"] >= row["rss_after_mb"] > 0  # Linux: from /proc/self/status


def test_each_cle_arm_ran_in_its_own_process_with_its_allocator(document):
    processes = document["cle_processes"]
    assert sorted((p["allocator"], p["thread"], p["size"]) for p in processes) == [
        ("default", "main", 64),
        ("tuned", "main", 64),
    ]
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    for process in processes:
        assert process["tuned"] is (glibc and process["allocator"] == "tuned"), process
