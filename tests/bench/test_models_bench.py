"""The model throughput benchmark runs end to end on the CPU, covers every model and step, and its ratios and
parameter counts are the figures it reports (timings are not judged here)."""

import json
import math

import pytest
import torch

from bench.models import BASELINE, BASELINE_MAP, CASES, CLE_FPS, QUICK_SIZE, QUICK_SPECTRAL_CHANNELS, main
from core.models import create_model


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run on one CPU thread (a busy machine would otherwise wait at thread barriers)."""
    out = tmp_path_factory.mktemp("bench") / "models.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_the_machine_and_settings_are_recorded(document):
    about = document["machine"]
    assert about["devices"] == ["cpu"] and about["cuda"] is None and about["threads"] == 1
    assert about["cpu"] and about["torch"] == torch.__version__
    assert document["settings"]["quick"] is True and document["cle_fps"] == CLE_FPS


def test_every_model_has_every_step_with_positive_finite_figures(document):
    rows = document["rows"]
    for case in CASES:
        mine = [r for r in rows if r["architecture"] == case.architecture and r["role"] == "model"]
        steps = sorted((r["step"], r["method"] or "", r["batch"]) for r in mine)
        expected = [("infer", "", 2), ("train", "", 2)] + [("map", m, 2) for m in case.maps]
        expected += [("map", m, 1) for m in case.maps] if case.cle else []
        assert steps == sorted(expected), case.architecture
        assert {r["size"] for r in mine} == {QUICK_SIZE}
        assert {r["in_chans"] for r in mine} == {QUICK_SPECTRAL_CHANNELS if case.in_chans > 1 else 1}
    for row in rows:
        figures = [row[k] for k in ("median_ms", "p90_ms", "ms_per_image", "images_per_s", "x_resnet18")]
        assert all(math.isfinite(value) and value > 0 for value in figures), row
        assert row["p90_ms"] >= row["median_ms"] and row["repeats"] == 2 and row["device"] == "cpu"
        assert row["images_per_s"] == pytest.approx(row["batch"] * 1000.0 / row["median_ms"])
        assert (row["precision"], row["memory_format"]) == ("float32", "contiguous")


def test_ratios_are_against_the_resnet18_row_of_the_same_input_step_and_batch(document):
    rows = document["rows"]
    reference = {
        (r["size"], r["in_chans"], r["step"], r["batch"]): r["images_per_s"]
        for r in rows
        if r["architecture"] == BASELINE and r["method"] in (None, BASELINE_MAP)
    }
    # one ResNet-18 per (size, channels) a model uses: the CLE models' own row and the spectral spots' reference
    inputs = {(size, chans) for size, chans, _, _ in reference}
    assert inputs == {(QUICK_SIZE, 1), (QUICK_SIZE, QUICK_SPECTRAL_CHANNELS)}
    for row in rows:
        baseline = reference[(row["size"], row["in_chans"], row["step"], row["batch"])]
        assert row["baseline_images_per_s"] == pytest.approx(baseline)
        assert row["x_resnet18"] == pytest.approx(row["images_per_s"] / baseline)
        if row["architecture"] == BASELINE and row["method"] in (None, BASELINE_MAP):
            assert row["x_resnet18"] == pytest.approx(1.0)


def test_parameters_are_those_of_a_freshly_built_model(document):
    for row in document["rows"]:
        model = create_model(row["architecture"], in_chans=row["in_chans"], **row["kwargs"])
        assert row["parameters"] == sum(p.numel() for p in model.parameters()), row["architecture"]
        assert row["parameters_m"] == pytest.approx(row["parameters"] / 1e6)


def test_cle_maps_at_batch_one_say_whether_they_keep_up_with_the_endomicroscope(document):
    cle = {case.architecture for case in CASES if case.cle}
    flagged = [r for r in document["rows"] if r["realtime_20fps"] is not None]
    assert {r["architecture"] for r in flagged} == cle
    assert all(r["step"] == "map" and r["batch"] == 1 for r in flagged)
    for row in flagged:
        assert row["realtime_20fps"] is (row["images_per_s"] >= CLE_FPS)
        assert row["ms_per_image"] == pytest.approx(row["median_ms"])
