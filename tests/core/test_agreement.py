"""Reader agreement of drawn masks: Dice and IoU by hand, bootstrap CIs, STAPLE on synthetic raters, majority vote,
the leave-one-out baseline, COCO RLE strings worked by hand, and the refusals of a bad mask folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from core.metrics.agreement import (
    agreement_report,
    dice_iou,
    leave_one_out,
    majority_vote,
    pairwise_agreement,
    read_mask_folder,
    rle_decode,
    rle_encode,
    staple,
    write_mask_folder,
)


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A boolean mask with region in each (row0, row1, col0, col1) box."""
    mask = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = True
    return mask


def _truth(n: int = 6, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        r, c = rng.integers(2, size - 14, 2)
        truth[f"case{i}"] = _mask((size, size), (r, r + 10, c, c + 11))
    return truth


def _flipped(truth: dict[str, np.ndarray], rate: float, seed: int) -> dict[str, np.ndarray]:
    """Each pixel flipped with probability ``rate``: a rater of known quality."""
    rng = np.random.default_rng(seed)
    return {case: mask ^ (rng.random(mask.shape) < rate) for case, mask in truth.items()}


def _write(path: Path, pixels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels.astype(np.uint8)).convert(mode).save(path)


def test_dice_and_iou_by_hand() -> None:
    a = _mask((4, 4), (0, 2, 0, 2))  # 4 pixels
    b = _mask((4, 4), (0, 2, 1, 4))  # 6 pixels, 2 shared with a
    assert dice_iou(a, b) == pytest.approx((2 * 2 / 10, 2 / 8))
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) is None
    with pytest.raises(ValueError, match="differ in shape"):
        dice_iou(a, np.zeros((3, 3), dtype=bool))


def test_pairwise_skips_both_empty_and_unannotated_cases() -> None:
    a = _mask((4, 4), (0, 2, 0, 2))
    b = _mask((4, 4), (0, 2, 1, 4))
    empty = np.zeros((4, 4), dtype=bool)
    masks = {
        "r1": {"x": a, "y": a, "z": empty, "only1": a},
        "r2": {"x": a, "y": b, "z": empty},
        "r3": {"x": b, "y": empty, "z": empty, "w": a},
    }
    rows = {(row["a"], row["b"]): row for row in pairwise_agreement(masks, n_boot=0)}
    assert list(rows) == [("r1", "r2"), ("r1", "r3"), ("r2", "r3")]
    r12 = rows["r1", "r2"]
    assert {"a", "b", "dice", "iou", "n_cases"} <= r12.keys()
    assert r12["n_cases"] == 2 and r12["both_empty"] == ["z"] and r12["n_unpaired"] == 1  # only1
    assert r12["dice"] == pytest.approx((1.0 + 0.4) / 2) and r12["iou"] == pytest.approx((1.0 + 0.25) / 2)
    assert [row["case"] for row in r12["per_case"]] == ["x", "y"]
    r13 = rows["r1", "r3"]  # x: a vs b; y: a vs empty (scores 0); z both empty; only1 and w unpaired
    assert r13["n_cases"] == 2 and r13["n_both_empty"] == 1 and r13["n_unpaired"] == 2
    assert r13["dice"] == pytest.approx(0.2) and r13["iou"] == pytest.approx(0.125)
    assert r13["dice_ci"] is None  # no resamples asked for
    with pytest.raises(ValueError, match="at least two readers, found 1: r1"):
        pairwise_agreement({"r1": masks["r1"]})
    with pytest.raises(ValueError, match=r"case 'x'.*differ in size \(r1 4x4, r2 3x3\)"):
        pairwise_agreement({"r1": {"x": a}, "r2": {"x": np.zeros((3, 3), dtype=bool)}})


def test_bootstrap_ci_contains_the_mean_and_is_fixed_by_the_seed() -> None:
    truth = _truth(n=12)
    masks = {"r1": truth, "r2": _flipped(truth, 0.05, 1)}
    (row,) = pairwise_agreement(masks, n_boot=400, seed=3)
    low, high = row["dice_ci"]
    assert low < row["dice"] < high and row["iou_ci"][0] < row["iou"] < row["iou_ci"][1]
    assert pairwise_agreement(masks, n_boot=400, seed=3)[0]["dice_ci"] == row["dice_ci"]
    assert pairwise_agreement(masks, n_boot=400, seed=4)[0]["dice_ci"] != row["dice_ci"]
    per_case = [case["dice"] for case in row["per_case"]]
    assert row["dice"] == pytest.approx(np.mean(per_case)) and min(per_case) <= low and high <= max(per_case)
    same = pairwise_agreement({"r1": truth, "r2": truth}, n_boot=100)[0]
    assert same["dice"] == 1.0 and same["dice_ci"] == [1.0, 1.0]


def test_staple_trusts_the_raters_who_agree_and_recovers_the_truth() -> None:
    truth = _truth()
    # every pixel has at most one rater wrong: the errors are drawn from disjoint slices of one uniform draw
    draws = dict(zip(truth, np.random.default_rng(7).random((len(truth), 32, 32)), strict=True))
    masks = {"perfect": truth}
    for reader, low, high in (("good1", 0.0, 0.02), ("good2", 0.02, 0.04), ("noisy", 0.04, 0.24)):
        masks[reader] = {case: mask ^ ((low <= draws[case]) & (draws[case] < high)) for case, mask in truth.items()}
    result = staple(masks)
    assert result.cases == tuple(truth) and result.converged and result.iterations > 0
    assert result.sensitivity["perfect"] > 0.99 and result.specificity["perfect"] > 0.99
    assert 0.7 < result.sensitivity["noisy"] < 0.9 and 0.7 < result.specificity["noisy"] < 0.9
    assert result.sensitivity["noisy"] < result.sensitivity["good1"] < 1.0
    for case in truth:
        np.testing.assert_array_equal(result.consensus[case], truth[case])
        np.testing.assert_array_equal(result.consensus[case], result.probability[case] > 0.5)
    # SimpleITK's estimates are Warfield et al.'s M-step (eqs. 19-20) on the probabilities it returns
    w = np.concatenate([result.probability[case].ravel() for case in truth])
    for reader, cases in masks.items():
        d = np.concatenate([cases[case].ravel() for case in truth])
        assert result.sensitivity[reader] == pytest.approx((w * d).sum() / w.sum(), abs=1e-6)
        assert result.specificity[reader] == pytest.approx(((1 - w) * ~d).sum() / (1 - w).sum(), abs=1e-6)
    # ... and the probabilities are its E-step with the prior g = the mean fraction of region over the readers
    d = np.stack([np.concatenate([cases[case].ravel() for case in truth]) for cases in masks.values()])
    p = np.array(list(result.sensitivity.values()))[:, None]
    q = np.array(list(result.specificity.values()))[:, None]
    a = d.mean() * np.prod(np.where(d, p, 1 - p), axis=0)
    b = (1 - d.mean()) * np.prod(np.where(d, 1 - q, q), axis=0)
    np.testing.assert_allclose(w, a / (a + b), atol=1e-6)


def test_staple_empty_full_and_incomplete_cases_are_defined() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    box = _mask((8, 8), (2, 6, 2, 6))
    result = staple({"a": {"x": box, "none": empty, "gap": box}, "b": {"x": box, "none": empty}})
    assert result.cases == ("none", "x") and result.all_empty == ("none",) and result.incomplete == ("gap",)
    assert not result.consensus["none"].any() and (result.probability["none"] == 0).all()
    np.testing.assert_array_equal(result.consensus["x"], box)
    assert result.sensitivity == {"a": 1.0, "b": 1.0} and result.specificity == {"a": 1.0, "b": 1.0}
    nothing = staple({"a": {"x": empty}, "b": {"x": empty}})
    assert nothing.sensitivity == {"a": None, "b": None} and nothing.specificity == {"a": None, "b": None}
    assert nothing.iterations == 0 and not nothing.consensus["x"].any()
    full = np.ones((8, 8), dtype=bool)
    everything = staple({"a": {"x": full}, "b": {"x": full}})
    assert everything.sensitivity == {"a": 1.0, "b": 1.0} and everything.specificity == {"a": None, "b": None}
    assert everything.consensus["x"].all()
    with pytest.raises(ValueError, match="STAPLE needs at least two readers"):
        staple({"a": {"x": box}})


def test_majority_vote_needs_more_than_half_and_a_tie_is_background() -> None:
    a, b, c = _mask((1, 4), (0, 1, 0, 3)), _mask((1, 4), (0, 1, 1, 4)), _mask((1, 4), (0, 1, 0, 1))
    np.testing.assert_array_equal(majority_vote([a, b, c]), [[True, True, True, False]])
    np.testing.assert_array_equal(majority_vote([a, b]), [[False, True, True, False]])
    np.testing.assert_array_equal(majority_vote([a]), a)


def test_leave_one_out_scores_each_reader_against_the_others() -> None:
    a = _mask((8, 8), (0, 4, 0, 4))  # 16 pixels
    b = _mask((8, 8), (0, 4, 0, 2))  # 8 of a's pixels
    rows = {row["reader"]: row for row in leave_one_out({"r1": {"x": a}, "r2": {"x": b}, "r3": {"x": b}}, n_boot=0)}
    assert rows["r1"]["reference"] == "staple" and rows["r1"]["others"] == ["r2", "r3"]
    assert rows["r1"]["dice"] == pytest.approx(2 * 8 / 24) and rows["r1"]["iou"] == pytest.approx(0.5)
    two = leave_one_out({"r1": {"x": a, "y": b}, "r2": {"x": b, "y": b}}, n_boot=0)
    assert [row["reference"] for row in two] == ["reader", "reader"]
    assert two[0]["dice"] == two[1]["dice"] == pytest.approx((2 * 8 / 24 + 1.0) / 2)


def test_rle_matches_coco_strings_worked_by_hand_and_round_trips() -> None:
    # column-major runs starting with background: [[0,1],[1,1]] -> 0 | 1 1 1 -> counts 1, 3
    assert rle_encode(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": "13"}
    # 3 x 3, columns (0,0,1) (1,1,0) (1,0,0) -> runs 2,3,1,1,2; run 3 is written as 1-3 = -2 -> 'N', run 4 as 2-1
    hand = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0]], dtype=bool)
    assert rle_encode(hand) == {"size": [3, 3], "counts": "231N1"}
    np.testing.assert_array_equal(rle_decode({"size": [3, 3], "counts": "231N1"}), hand)
    # a run of 40 takes two characters: 40 & 31 = 8 with the continuation bit (8 + 32 + 48 = 'X'), then 40 >> 5 = 1
    row = np.ones((1, 41), dtype=bool)
    row[0, 0] = False
    assert rle_encode(row)["counts"] == "1X1"
    mask = np.random.default_rng(0).random((37, 23)) < 0.3
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)
    assert rle_decode(rle_encode(np.zeros((5, 4)))).shape == (5, 4)


def test_read_mask_folder_reads_readers_and_thresholds_at_128(tmp_path: Path) -> None:
    pixels = np.array([[0, 127], [128, 255]], dtype=np.uint8)
    _write(tmp_path / "masks" / "alice" / "c1.png", pixels)
    _write(tmp_path / "masks" / "bob" / "c1.png", np.zeros((2, 2)))
    _write(tmp_path / "masks" / "bob" / "c2.png", np.full((3, 3), 255), mode="1")
    (tmp_path / "masks" / "bob" / "notes.txt").write_text("not a mask")
    (tmp_path / "masks" / "bob" / "._c1.png").write_bytes(b"macOS resource fork")
    masks = read_mask_folder(tmp_path / "masks")
    assert list(masks) == ["alice", "bob"] and list(masks["bob"]) == ["c1", "c2"]
    np.testing.assert_array_equal(masks["alice"]["c1"], [[False, False], [True, True]])
    assert masks["bob"]["c2"].all() and masks["bob"]["c2"].dtype == bool
    written = write_mask_folder(masks["alice"], tmp_path / "out")
    assert [p.name for p in written] == ["c1.png"]
    assert np.asarray(PILImage.open(written[0])).tolist() == [[0, 0], [255, 255]]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "holds no reader folders"),
        ({"c1.png": np.zeros((2, 2))}, "lie directly in it"),
        ({"alice/c1.png": np.zeros((2, 2)), "bob/notes.txt": None}, "reader 'bob' has no mask PNGs"),
        ({"alice/c1.jpg": np.zeros((2, 2))}, r"alice/c1.jpg: masks must be PNG files"),
        ({"alice/c1.png": np.zeros((2, 2)), "alice/c1.PNG": np.zeros((2, 2))}, "two masks for case 'c1'"),
        (
            {"alice/c1.png": np.zeros((2, 2)), "bob/c1.png": np.zeros((3, 2))},
            r"case 'c1': the readers' masks differ in size \(alice 2x2, bob 3x2\)",
        ),
        ({"alice/c1.png": np.dstack([np.zeros((2, 2))] * 3)}, "8-bit grayscale PNG .* not mode RGB"),
    ],
)
def test_read_mask_folder_refuses_bad_input_naming_it(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "masks"
    root.mkdir()
    for name, pixels in layout.items():
        path = root / name
        if pixels is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("notes")
        elif path.suffix == ".jpg":
            path.parent.mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG")
        else:
            _write(path, pixels, mode="RGB" if pixels.ndim == 3 else "L")
    with pytest.raises(ValueError, match=message):
        read_mask_folder(root)


def test_read_mask_folder_refuses_a_missing_folder_and_a_renamed_jpeg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        read_mask_folder(tmp_path / "nowhere")
    (tmp_path / "alice").mkdir()
    PILImage.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "alice" / "c1.png", format="JPEG")
    with pytest.raises(ValueError, match="c1.png: not a PNG file"):
        read_mask_folder(tmp_path)


def test_agreement_report_holds_every_part_in_json_ready_values() -> None:
    truth = _truth(n=4)
    truth["blank"] = np.zeros((32, 32), dtype=bool)
    masks = {"r1": truth, "r2": _flipped(truth, 0.01, 1), "r3": dict(truth)}
    masks["r2"]["blank"] = np.zeros((32, 32), dtype=bool)
    del masks["r3"]["case0"]
    report = agreement_report(masks, n_boot=50, seed=1)
    assert [r["reader"] for r in report["readers"]] == ["r1", "r2", "r3"]
    assert report["readers"][0]["n_empty"] == 1 and report["readers"][2]["n_cases"] == 4
    assert all(r["sensitivity"] > 0.9 and r["specificity"] > 0.9 for r in report["readers"])
    assert report["staple"]["incomplete_cases"] == ["case0"] and report["staple"]["all_empty_cases"] == ["blank"]
    assert [row["case"] for row in report["staple"]["per_case"]] == ["blank", "case1", "case2", "case3"]
    vs = report["majority_vote"]["vs_staple"]
    assert vs["dice"] == 1.0 and vs["n_cases"] == 3 and vs["both_empty"] == ["blank"]
    assert [row["reader"] for row in report["leave_one_out"]] == ["r1", "r2", "r3"]
    assert report["bootstrap"] == {"n_boot": 50, "seed": 1, "level": 0.95, "resampled": "cases"}
    r13 = report["pairwise"][1]
    assert (r13["a"], r13["b"], r13["dice"], r13["n_cases"], r13["n_unpaired"]) == ("r1", "r3", 1.0, 3, 1)
