"""Pixel AUC, Dice sweep, FCN scores and the 75 % region rule on synthetic maps and masks with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sklearn.metrics import roc_auc_score

from core.metrics.localization import (
    _pair_matrix,
    dice_per_image,
    dice_sweep,
    evaluate_localization,
    fraction_above,
    load_map,
    load_mask,
    localization_scores,
    pixel_auc,
    pixel_roc,
    roc_points,
    segmentation_scores,
)
from services.cli import main


def _masks(seed: int = 0, n: int = 4, size: int = 32) -> list[np.ndarray]:
    """Label images (1 / 0 / -1) with a positive square, a negative rest and an unlabeled band."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = np.zeros((size, size), dtype=np.int8)
        r, c = rng.integers(2, size - 14, 2)
        k[r : r + 10, c : c + 10] = 1
        k[:, :2] = -1
        out.append(k)
    return out


def _perfect(masks: list[np.ndarray]) -> list[np.ndarray]:
    return [np.where(k == 1, 0.9, 0.1) for k in masks]


def test_perfect_map_scores_one() -> None:
    masks = _masks()
    maps = _perfect(masks)
    auc = pixel_auc(maps, masks, bootstrap=200)
    assert auc["estimate"] == 1.0 and auc["ci"] == [1.0, 1.0]
    dice = dice_sweep(maps, masks)
    assert dice["dice"] == 1.0 and 0.1 < dice["best_threshold"] <= 0.9
    scores = segmentation_scores(maps, masks, 0.5)
    assert scores["mean_acc"] == scores["mean_iu"] == scores["fw_iu"] == scores["dice"] == 1.0
    assert localization_scores(maps, masks, 0.5)["precision"] == 1.0


def test_inverted_map_auc_zero_and_random_map_near_half() -> None:
    masks = _masks()
    inverted = [1.0 - m for m in _perfect(masks)]
    assert pixel_auc(inverted, masks, bootstrap=0)["estimate"] == 0.0
    rng = np.random.default_rng(1)
    noise = [rng.random(k.shape) for k in masks]
    result = pixel_auc(noise, masks, bootstrap=300)
    assert abs(result["estimate"] - 0.5) < 0.05
    assert result["ci"][0] < result["estimate"] < result["ci"][1]


def test_auc_is_exact_and_bootstrap_is_seeded() -> None:
    masks = _masks(n=5)
    rng = np.random.default_rng(2)
    maps = [np.round(np.clip(0.3 * k + rng.random(k.shape) * 0.7, 0, 1), 2) for k in masks]  # many ties
    labeled = [k >= 0 for k in masks]
    truth = np.concatenate([k[s] for k, s in zip(masks, labeled, strict=True)])
    scores = np.concatenate([m[s] for m, s in zip(maps, labeled, strict=True)])
    first = pixel_auc(maps, masks, bootstrap=100, seed=3)
    assert first["estimate"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert pixel_auc(maps, masks, bootstrap=100, seed=3)["ci"] == first["ci"]
    assert pixel_auc(maps, masks, bootstrap=100, seed=4)["ci"] != first["ci"]


def test_bootstrap_resample_equals_pooled_auc_of_drawn_images() -> None:
    masks = _masks(n=3)
    rng = np.random.default_rng(5)
    maps = [np.clip(0.4 * k + rng.random(k.shape) * 0.6, 0, 1) for k in masks]
    # image 0 twice, image 2 once: the weighted pair-matrix formula must match the AUC of those copies pooled
    drawn = [0, 0, 2]
    direct = pixel_auc([maps[i] for i in drawn], [masks[i] for i in drawn], bootstrap=0)["estimate"]
    values = np.concatenate([m[k >= 0] for m, k in zip(maps, masks, strict=True)])
    positive = np.concatenate([k[k >= 0] == 1 for k in masks])
    image = np.repeat(np.arange(3), [int((k >= 0).sum()) for k in masks])
    levels = np.unique(values, return_inverse=True)[1].ravel()
    pairs = _pair_matrix(levels, positive, image, 3)
    w = np.array([2.0, 0.0, 1.0])
    pos = np.bincount(image[positive], minlength=3)
    neg = np.bincount(image[~positive], minlength=3)
    assert w @ pairs @ w / ((w @ pos) * (w @ neg)) == pytest.approx(direct, abs=1e-12)


def test_no_negative_pixels_gives_null_auc_with_note() -> None:
    masks = [np.ones((4, 4), dtype=np.int8)]
    result = pixel_auc([np.full((4, 4), 0.7)], masks)
    assert result["estimate"] is None and result["ci"] is None and "negative" in result["note"]


def test_fcn_scores_hand_computed() -> None:
    # truth:      pred (>= 0.5):   n = [[tn fp], [fn tp]] = [[3 1], [2 4]]
    truth = np.array([[0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=np.int8)
    probs = np.array([[0.1, 0.2, 0.3, 0.6, 0.4], [0.45, 0.5, 0.7, 0.8, 0.9]])
    scores = segmentation_scores([probs], [truth], 0.5)
    assert scores["confusion"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 4}
    # acc: 3/4, 4/6; IU: 3/(4+5-3)=3/6, 4/(6+5-4)=4/7; fw: (4*3/6 + 6*4/7) / 10
    assert scores["mean_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert scores["mean_iu"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert scores["fw_iu"] == pytest.approx((4 * 3 / 6 + 6 * 4 / 7) / 10)
    assert scores["pixel_acc"] == pytest.approx(7 / 10)
    assert scores["dice"] == pytest.approx(8 / 11)


def test_dice_sweep_matches_direct_loop() -> None:
    masks = _masks(n=3)
    rng = np.random.default_rng(6)
    maps = [np.clip(0.5 * k + rng.random(k.shape) * 0.5, 0, 1) for k in masks]
    maps[0][0, 5] = 0.06  # exactly on a step: map >= t counts it
    result = dice_sweep(maps, masks)
    for i, t in enumerate(result["thresholds"]):
        dices = segmentation_scores(maps, masks, t)["dice"]
        assert result["curve"][i] == pytest.approx(dices, abs=1e-12)
    assert len(result["thresholds"]) == 51 and result["thresholds"][-1] == 1.0
    assert result["dice"] == max(result["curve"])


def test_unlabeled_pixels_change_nothing() -> None:
    masks = _masks()
    rng = np.random.default_rng(7)
    maps = [np.clip(0.5 * k + rng.random(k.shape) * 0.5, 0, 1) for k in masks]
    changed = [np.where(k < 0, rng.random(k.shape), m) for m, k in zip(maps, masks, strict=True)]
    for metric in (
        lambda m: pixel_auc(m, masks, bootstrap=50),
        lambda m: dice_sweep(m, masks),
        lambda m: segmentation_scores(m, masks, 0.5),
    ):
        assert metric(changed) == metric(maps)


def test_localization_regions_by_the_75_percent_rule() -> None:
    truth = np.zeros((20, 20), dtype=np.int8)
    truth[1:5, 1:5] = 1  # ground-truth region A (16 px)
    truth[10:14, 10:14] = 1  # ground-truth region B, never hit
    truth[15:20, 0:5] = -1  # unlabeled corner
    probs = np.zeros((20, 20))
    probs[1:5, 1:6] = 0.9  # 16 positive + 4 negative = 80 % positive -> true positive, hits A
    probs[7:9, 1:6] = 0.9  # all negative -> false positive
    probs[10:14, 8:13] = 0.9  # 12 positive + 8 negative = 60 % -> neither
    probs[16:19, 1:4] = 0.9  # all unlabeled -> neither
    result = localization_scores([probs], [truth], 0.5)
    assert result["regions"] == {"tp": 1, "fp": 1, "mixed": 1, "unlabeled": 1, "gt_regions": 2, "gt_hit": 1}
    assert result["precision"] == 0.5 and result["recall"] == 0.5
    # the unlabeled pixels of a region do not count in its fraction: 12 positive + 4 negative + 4 unlabeled = 75 %
    truth2 = np.zeros((6, 6), dtype=np.int8)
    truth2[0:3, 0:4] = 1
    truth2[3, 0:4] = 0
    truth2[4, 0:4] = -1
    probs2 = np.zeros((6, 6))
    probs2[0:5, 0:4] = 0.8
    assert localization_scores([probs2], [truth2], 0.5)["regions"]["tp"] == 1
    assert localization_scores([np.zeros((6, 6))], [truth2], 0.5)["precision"] is None


def _write_case(tmp_path: Path, png_maps: bool = False) -> tuple[Path, Path, list[np.ndarray]]:
    maps_dir, masks_dir = tmp_path / "maps", tmp_path / "masks"
    maps_dir.mkdir(parents=True)
    masks_dir.mkdir()
    rng = np.random.default_rng(8)
    pixels_list = []
    for i, k in enumerate(_masks(n=3)):
        pixels = np.where(k == 1, 255, np.where(k == 0, 0, 128)).astype(np.uint8)
        PILImage.fromarray(pixels).save(masks_dir / f"case{i}.png")
        level = np.clip(0.5 * (k == 1) + rng.random(k.shape) * 0.5, 0, 1)
        as_8bit = np.round(level * 255).astype(np.uint8)
        if png_maps:
            PILImage.fromarray(as_8bit).save(maps_dir / f"case{i}.png")
        else:
            np.save(maps_dir / f"case{i}.npy", as_8bit / 255.0)
        pixels_list.append(pixels)
    return maps_dir, masks_dir, pixels_list


def test_npy_and_png_maps_give_the_same_report(tmp_path: Path) -> None:
    npy = evaluate_localization(*_write_case(tmp_path / "a")[:2], bootstrap=100)
    png = evaluate_localization(*_write_case(tmp_path / "b", png_maps=True)[:2], bootstrap=100)
    for key in ("pixel_auc", "dice", "at_threshold", "localization", "n_images", "n_labeled_pixels"):
        assert npy[key] == png[key]
    assert npy["n_images"] == 3 and npy["n_labeled_pixels"] == 3 * 32 * 30
    assert npy["pixel_auc"]["estimate"] > 0.9


def test_map_and_mask_codes(tmp_path: Path) -> None:
    pixels = np.array([[0, 255, 128, 1]], dtype=np.uint8)
    PILImage.fromarray(pixels).save(tmp_path / "m.png")
    np.save(tmp_path / "m.npy", pixels / 255.0)
    assert load_mask(tmp_path / "m.png").tolist() == [[0, 1, -1, -1]]
    assert np.array_equal(load_map(tmp_path / "m.png"), load_map(tmp_path / "m.npy"))
    assert load_map(tmp_path / "m.png")[0, 2] == 128 / 255


def test_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maps_dir, masks_dir, _ = _write_case(tmp_path)
    out = tmp_path / "out" / "report.json"
    argv = ["evaluate-localization", "--maps", str(maps_dir), "--masks", str(masks_dir), "--out", str(out)]
    assert main([*argv, "--threshold", "0.6", "--bootstrap", "50"]) == 0
    report = json.loads(out.read_text())
    assert report["at_threshold"]["threshold"] == 0.6 and report["localization"]["threshold"] == 0.6
    assert [f["stem"] for f in report["files"]] == ["case0", "case1", "case2"]
    assert set(report["pixel_auc"]) >= {"estimate", "ci"} and len(report["pixel_auc"]["ci"]) == 2
    assert set(report["at_threshold"]) >= {"mean_acc", "mean_iu", "fw_iu", "dice"}
    assert set(report["localization"]) >= {"precision", "recall"}
    assert "report ->" in capsys.readouterr().out


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    argv = ["evaluate-localization", "--maps", str(tmp_path / "maps"), "--masks", str(tmp_path / "masks")]
    assert main([*argv, "--out", str(tmp_path / "r.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not (tmp_path / "r.json").exists()
    return err


def test_cli_refuses_unpaired_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maps_dir, masks_dir, _ = _write_case(tmp_path)
    (maps_dir / "case0.npy").rename(maps_dir / "extra.npy")
    err = _refused(tmp_path, capsys)
    assert "maps without masks: extra.npy" in err and "masks without maps: case0.png" in err


def test_cli_refuses_shape_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maps_dir, _, _ = _write_case(tmp_path)
    np.save(maps_dir / "case1.npy", np.zeros((16, 32)))
    assert "case1.npy: map shape (16, 32) differs from mask shape (32, 32)" in _refused(tmp_path, capsys)


@pytest.mark.parametrize(
    ("value", "message"), [(1.5, "must lie in [0, 1], found [0, 1.5]"), (np.nan, "holds NaN"), (-0.1, "[0, 1]")]
)
def test_cli_refuses_bad_map_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float, message: str):
    maps_dir, _, _ = _write_case(tmp_path)
    bad = np.zeros((32, 32))
    bad[3, 3] = value
    np.save(maps_dir / "case2.npy", bad)
    err = _refused(tmp_path, capsys)
    assert "case2.npy" in err and message in err


def test_cli_refuses_unreadable_and_unlabeled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maps_dir, masks_dir, _ = _write_case(tmp_path)
    (maps_dir / "case0.npy").write_bytes(b"not a numpy file")
    err = _refused(tmp_path, capsys)
    assert "case0.npy: unreadable map" in err
    np.save(maps_dir / "case0.npy", np.zeros((32, 32)))
    (masks_dir / "case1.png").write_bytes(b"\x89PNG broken")
    assert "case1.png: unreadable mask" in _refused(tmp_path, capsys)
    PILImage.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(masks_dir / "case1.png")
    assert "case1.png: the mask has no labeled pixels" in _refused(tmp_path, capsys)
    PILImage.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(maps_dir / "case0.png")
    (maps_dir / "case0.npy").unlink()
    assert "case0.png: a PNG map must be 8-bit grayscale" in _refused(tmp_path, capsys)
    assert "--threshold must lie in [0, 1]" in _refused(tmp_path, capsys, "--threshold", "2")


def test_cli_reports_null_auc_without_negatives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("maps", "masks"):
        (tmp_path / name).mkdir()
    np.save(tmp_path / "maps" / "a.npy", np.full((8, 8), 0.8))
    PILImage.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    out = tmp_path / "r.json"
    argv = ["evaluate-localization", "--maps", str(tmp_path / "maps"), "--masks", str(tmp_path / "masks")]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pixel_auc"]["estimate"] is None and "no negative" in report["pixel_auc"]["note"]
    assert report["at_threshold"]["dice"] == 1.0 and report["localization"]["recall"] == 1.0
    assert "pixel AUC undefined" in capsys.readouterr().out


def test_dice_per_image_hand_computed_with_mean_and_sample_sd() -> None:
    """Three 4 x 4 images, the last column unlabeled (its predictions must not count)."""
    masks = [np.zeros((4, 4), np.int8) for _ in range(3)]
    for k in masks:
        k[:2, :2] = 1  # 4 positive pixels
        k[:, 3] = -1
    maps = [np.zeros((4, 4)) for _ in range(3)]
    maps[0][:2, :2] = 0.9  # perfect: Dice 1
    maps[1][:2, :1] = 0.5  # 2 of 4 found, none false: 2*2 / (2 + 4) = 2/3
    maps[2][:2, :2] = 0.9
    maps[2][2:, :3] = 0.35  # 4 found, 6 false: 8 / (10 + 4) = 4/7 (at threshold .35, map >= t)
    for m in maps:
        m[:, 3] = 1.0
    report = dice_per_image(maps, masks, 0.35)
    expected = [1.0, 2 / 3, 4 / 7]
    assert report["per_image"] == pytest.approx(expected)
    assert report["n"] == 3 and report["mean"] == pytest.approx(np.mean(expected))
    assert report["sd"] == pytest.approx(np.std(expected, ddof=1))
    # pooled Dice is not the mean of the per-image Dice
    assert segmentation_scores(maps, masks, 0.35)["dice"] == pytest.approx(2 * 10 / (2 * 10 + 6 + 2))


def test_dice_per_image_leaves_out_images_where_it_is_undefined() -> None:
    empty = np.zeros((3, 3), np.int8)  # no positive pixel
    hit = np.zeros((3, 3), np.int8)
    hit[0, 0] = 1
    report = dice_per_image([np.zeros((3, 3)), np.eye(3)], [empty, hit], 0.5)
    assert report["per_image"] == [None, pytest.approx(0.5)]
    assert report["n"] == 1 and report["mean"] == pytest.approx(0.5) and report["sd"] is None
    assert dice_per_image([np.eye(3)], [empty], 0.5)["per_image"] == [0.0]  # false positives only: 0, defined


def test_fraction_above_counts_labeled_pixels_only() -> None:
    masks = [np.array([[0, 1], [-1, -1]], np.int8), np.array([[0, 0], [0, 0]], np.int8), np.full((2, 2), -1, np.int8)]
    maps = [np.array([[0.35, 0.1], [1.0, 1.0]]), np.array([[0.9, 0.0], [0.5, 0.34]]), np.ones((2, 2))]
    np.testing.assert_allclose(fraction_above(maps, masks, 0.35), [0.5, 0.5, 0.0])


def test_roc_points_on_a_hand_computed_case() -> None:
    """Scores .9 (+), .8 (-), .7 (+), .7 (-), .1 (-): corners at thresholds .9, .8, .7 (a tie: diagonal) and .1."""
    truth = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.1])
    roc = roc_points(truth, scores)
    assert roc["fpr"] == pytest.approx([0, 0, 1 / 3, 2 / 3, 1])
    assert roc["tpr"] == pytest.approx([0, 0.5, 0.5, 1, 1])
    assert roc["thresholds"][1:] == pytest.approx([0.9, 0.8, 0.7, 0.1])
    assert 0.9 < roc["thresholds"][0] < 0.9 + 1e-9  # just above the highest score: JSON-ready, no +inf
    assert roc["auc"] == pytest.approx(roc_auc_score(truth, scores)) and roc["auc"] == pytest.approx(4.5 / 6)
    assert (roc["n_positive"], roc["n_negative"]) == (2, 3)
    undefined = roc_points(np.ones(3), np.arange(3.0))
    assert undefined["auc"] is None and undefined["fpr"] == [] and "no negative" in undefined["note"]
    with pytest.raises(ValueError, match="one score per case"):
        roc_points(truth, scores[:4])


def test_pixel_roc_is_the_curve_of_pixel_auc_and_thins_to_exact_points() -> None:
    masks = _masks(3)
    rng = np.random.default_rng(3)
    maps = [np.clip(0.3 * k + rng.uniform(0, 0.7, k.shape), 0, 1) for k in masks]
    full = pixel_roc(maps, masks)
    assert full["auc"] == pytest.approx(pixel_auc(maps, masks, bootstrap=0)["estimate"])
    labeled = np.concatenate([k[k >= 0] for k in masks])
    assert (full["n_positive"], full["n_negative"]) == (int((labeled == 1).sum()), int((labeled == 0).sum()))
    thin = pixel_roc(maps, masks, max_points=50)
    assert len(thin["fpr"]) == 50 < full["points"] == thin["points"] == len(full["fpr"])
    assert thin["auc"] == full["auc"]
    assert (thin["fpr"][0], thin["tpr"][0], thin["fpr"][-1], thin["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    exact = set(zip(full["fpr"], full["tpr"], strict=True))
    assert all(point in exact for point in zip(thin["fpr"], thin["tpr"], strict=True))
