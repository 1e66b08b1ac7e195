"""Heatmaps held against expert masks (core.metrics.experts): a map equal to the consensus scores at the top, a
random map falls below the readers' range, readers are scored against the consensus of the others, and cases whose
consensus is empty count only in the no-region figures."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics.agreement import dice_iou, leave_one_out, pairwise_agreement, staple
from core.metrics.experts import compare_with_experts, expert_panel, score_map, within_range

SIDE = 40


def disc(centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def readers_masks(n_readers: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """Six cases with a region each reader draws a pixel or two off the others, a case nobody drew ("empty") and one
    only the first reader drew ("lonely"): the consensus of all readers is empty on both."""
    masks: dict[str, dict[str, np.ndarray]] = {}
    for j in range(n_readers):
        cases = {f"c{k}": disc((14 + 2 * k + (j - 1), 16 + k - (j - 1)), 6 + k % 3 + j % 2) for k in range(6)}
        cases["empty"] = np.zeros((SIDE, SIDE), bool)
        cases["lonely"] = disc((20, 20), 5) if j == 0 else np.zeros((SIDE, SIDE), bool)
        masks[f"r{j}"] = cases
    return masks


def consensus_maps(masks) -> dict[str, np.ndarray]:
    return {case: m.astype(np.float32) for case, m in staple(masks).consensus.items()}


def test_a_map_equal_to_the_consensus_scores_at_the_top_and_above_the_readers() -> None:
    masks = readers_masks()
    report = compare_with_experts(
        {"perfect": consensus_maps(masks)}, masks, thresholds=(0.03, 0.2), operating={"perfect": 0.03}, n_boot=100
    )
    assert report["cases"] == {"region": [f"c{k}" for k in range(6)], "empty": ["empty", "lonely"], "incomplete": []}
    (model,) = report["models"]
    vs = model["vs_consensus"]
    assert vs["dice"] == vs["iou"] == vs["best_dice"] == vs["pixel_auc"] == 1.0
    assert [t["mean_iu"] for t in vs["table2"]] == [1.0, 1.0] and vs["n_cases"] == 6
    assert model["empty"] == {"n_cases": 2, "clear": 1.0, "specificity": 1.0}
    readers = [r["dice"] for r in report["readers"]]
    assert max(readers) < 1.0
    assert model["range"]["dice"] == {
        "value": 1.0, "low": min(readers), "high": max(readers), "verdict": "above", "answer": True
    }  # fmt: skip
    assert model["range"]["mean_iu"]["verdict"] == "above"
    # against each reader alone: the map's region against that reader's masks, case by case
    for reader, figures in model["vs_readers"].items():
        dice = np.mean(
            [dice_iou(masks[reader][c], consensus_maps(masks)[c] >= 0.03)[0] for c in report["cases"]["region"]]
        )
        assert figures["dice"] == pytest.approx(dice)


def test_a_map_at_another_size_is_resized_to_the_masks() -> None:
    masks = readers_masks()
    doubled = {case: np.kron(m, np.ones((2, 2), np.float32)) for case, m in consensus_maps(masks).items()}
    report = compare_with_experts({"x2": doubled}, masks, thresholds=(0.5,), operating={"x2": 0.5}, n_boot=0)
    vs = report["models"][0]["vs_consensus"]
    assert vs["dice"] > 0.9 and vs["pixel_auc"] > 0.99 and vs["pixel_auc_ci"] is None  # no resamples asked


def test_a_random_map_scores_lower_and_below_the_experts() -> None:
    masks = readers_masks()
    rng = np.random.default_rng(3)
    noise = {case: rng.random((SIDE // 2, SIDE // 2)) for case in masks["r0"]}
    report = compare_with_experts(
        {"noise": noise, "perfect": consensus_maps(masks)},
        masks,
        thresholds=(0.03, 0.2),
        operating={"noise": 0.2, "perfect": 0.2},
        n_boot=200,
    )
    noise_row, perfect_row = report["models"]
    low, high = noise_row["vs_consensus"]["pixel_auc_ci"]
    assert 0.4 < low <= noise_row["vs_consensus"]["pixel_auc"] <= high < 0.6  # chance, give or take the smoothing
    assert perfect_row["vs_consensus"]["pixel_auc"] == 1.0
    assert noise_row["vs_consensus"]["dice"] < 0.5 < min(r["dice"] for r in report["readers"])
    assert noise_row["vs_consensus"]["mean_iu"] < perfect_row["vs_consensus"]["mean_iu"]
    assert noise_row["range"]["dice"]["verdict"] == "below" and noise_row["range"]["dice"]["answer"] is False
    assert noise_row["empty"]["clear"] == 0.0 and 0.0 < noise_row["empty"]["specificity"] < 0.5


def test_readers_are_held_against_the_consensus_of_the_others() -> None:
    masks = readers_masks()
    report = compare_with_experts({}, masks, thresholds=(0.03, 0.2), operating={}, n_boot=100)
    region = report["cases"]["region"]
    loo = {
        row["reader"]: row
        for row in leave_one_out({r: {c: m[c] for c in region} for r, m in masks.items()}, n_boot=100)
    }
    for row in report["readers"]:
        assert row["reference"] == "staple" and row["others"] == [r for r in masks if r != row["reader"]]
        assert (row["dice"], row["iou"], row["dice_ci"]) == (
            loo[row["reader"]]["dice"],
            loo[row["reader"]]["iou"],
            loo[row["reader"]]["dice_ci"],
        )
        first, second = row["table2"]
        assert {k: first[k] for k in ("mean_acc", "mean_iu", "fw_iu")} == {
            k: second[k] for k in ("mean_acc", "mean_iu", "fw_iu")
        }
        assert row["best_dice"] is None  # a binary mask has nothing to sweep
        assert row["pixel_auc"] == pytest.approx(first["mean_acc"])  # a 0/1 map's AUC is its balanced accuracy
    lonely = {row["reader"]: row["empty"] for row in report["readers"]}
    assert lonely["r0"]["clear"] == 0.5 and lonely["r1"] == {"n_cases": 2, "clear": 1.0, "specificity": 1.0}
    assert report["range"]["dice"] == {
        "low": min(loo[r]["dice"] for r in loo),
        "high": max(loo[r]["dice"] for r in loo),
    }
    # two readers: each one's reference is the other reader's mask, so both get their pair's Dice
    two = {r: masks[r] for r in ("r0", "r1")}
    scored = expert_panel(two).region_cases
    pair = pairwise_agreement({r: {c: m[c] for c in scored} for r, m in two.items()}, n_boot=0)[0]
    rows = compare_with_experts({}, two, thresholds=(0.5,), operating={}, n_boot=0)["readers"]
    assert [r["reference"] for r in rows] == ["reader", "reader"]
    assert rows[0]["dice"] == rows[1]["dice"] == pair["dice"] and rows[0]["n_cases"] == pair["n_cases"]


def test_the_readers_range_rule() -> None:
    readers = [0.6, None, 0.8, 0.7]
    assert within_range(0.5, readers) == {"value": 0.5, "low": 0.6, "high": 0.8, "verdict": "below", "answer": False}
    assert within_range(0.6, readers)["verdict"] == "within" and within_range(0.6, readers)["answer"]  # ends count
    assert within_range(0.8, readers)["verdict"] == "within"
    assert within_range(0.81, readers)["verdict"] == "above" and within_range(0.81, readers)["answer"]
    assert within_range(None, readers)["verdict"] is None and within_range(0.7, [None])["answer"] is None


def test_empty_consensus_and_bad_inputs_are_refused_or_set_apart() -> None:
    masks = readers_masks()
    panel = expert_panel(masks)
    assert panel.empty_cases == ("empty", "lonely") and "lonely" not in panel.region_cases
    maps = consensus_maps(masks)
    marked = dict(maps, lonely=disc((20, 20), 5).astype(np.float32))  # the map marks what only r0 saw
    scored = score_map(marked, panel, thresholds=(0.5,), operating_threshold=0.5, n_boot=0)
    assert scored["vs_consensus"]["dice"] == 1.0  # the no-region cases never enter the pixel figures
    assert scored["empty"]["clear"] == 0.5
    assert scored["empty"]["specificity"] == pytest.approx(1 - disc((20, 20), 5).sum() / (2 * SIDE * SIDE))
    with pytest.raises(ValueError, match="no map for case"):
        score_map({k: v for k, v in maps.items() if k != "c3"}, panel, thresholds=(0.5,), operating_threshold=0.5)
    with pytest.raises(ValueError, match="case 'c0'"):
        score_map(dict(maps, c0=maps["c0"] * 2), panel, thresholds=(0.5,), operating_threshold=0.5)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        score_map(maps, panel, thresholds=(0.0,), operating_threshold=0.5)
    nobody = {r: {"a": np.zeros((8, 8), bool), "b": np.zeros((8, 8), bool)} for r in ("r0", "r1")}
    with pytest.raises(ValueError, match="nothing to localise"):
        compare_with_experts({}, nobody, thresholds=(0.5,), operating={})
    with pytest.raises(ValueError, match="at least two readers"):
        expert_panel({"r0": masks["r0"]})
