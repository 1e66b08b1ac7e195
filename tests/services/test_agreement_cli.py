"""``python -m core agreement --masks DIR --out report.json [--consensus-out DIR2]``: the contract of issue 16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from services.cli import main


def _write(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


@pytest.fixture
def masks_dir(tmp_path: Path) -> Path:
    """Three readers, three cases: case1 drawn alike, case2 with one reader larger, case3 left empty by all."""
    box = np.zeros((16, 16), dtype=bool)
    box[4:10, 4:10] = True  # 36 pixels
    wide = np.zeros((16, 16), dtype=bool)
    wide[4:10, 4:16] = True  # 72 pixels, box inside
    root = tmp_path / "masks"
    for reader in ("ana", "ben", "cy"):
        _write(root / reader / "case1.png", box)
        _write(root / reader / "case2.png", wide if reader == "cy" else box)
        _write(root / reader / "case3.png", np.zeros((16, 16), dtype=bool))
    return root


def test_agreement_writes_the_contracted_report_and_consensus_pngs(
    masks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, consensus = tmp_path / "out" / "report.json", tmp_path / "consensus"
    args = ["agreement", "--masks", str(masks_dir), "--out", str(out), "--consensus-out", str(consensus)]
    assert main([*args, "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "3 readers, 3 cases" in printed and f"report -> {out}" in printed
    report = json.loads(out.read_text())
    pairs = {(row["a"], row["b"]): row for row in report["pairwise"]}
    assert list(pairs) == [("ana", "ben"), ("ana", "cy"), ("ben", "cy")]
    for row in pairs.values():
        assert {"a", "b", "dice", "iou", "n_cases"} <= row.keys() and row["n_cases"] == 2
    assert pairs["ana", "ben"]["dice"] == 1.0 and pairs["ana", "ben"]["iou"] == 1.0
    assert pairs["ana", "cy"]["dice"] == pytest.approx((1.0 + 2 * 36 / 108) / 2)
    assert pairs["ana", "cy"]["iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert pairs["ana", "cy"]["both_empty"] == ["case3"]
    readers = {row["reader"]: row for row in report["readers"]}
    assert list(readers) == ["ana", "ben", "cy"]
    assert readers["ana"]["sensitivity"] == pytest.approx(1.0) and readers["ana"]["specificity"] == pytest.approx(1.0)
    assert readers["cy"]["sensitivity"] == pytest.approx(1.0) and readers["cy"]["specificity"] < 1.0
    assert report["majority_vote"]["vs_staple"]["dice"] == 1.0
    assert {row["reader"] for row in report["leave_one_out"]} == {"ana", "ben", "cy"}
    assert sorted(p.name for p in consensus.iterdir()) == ["case1.png", "case2.png", "case3.png"]
    for case in ("case1", "case2", "case3"):
        pixels = np.asarray(PILImage.open(consensus / f"{case}.png"))
        assert pixels.dtype == np.uint8 and set(np.unique(pixels)) <= {0, 255}
        expected = np.asarray(PILImage.open(masks_dir / "ana" / f"{case}.png"))
        np.testing.assert_array_equal(pixels, expected)  # two of three readers drew ana's mask


def test_agreement_refuses_bad_input_with_one_error_line(
    masks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"

    def refused(*extra: str, masks: Path = masks_dir) -> str:
        assert main(["agreement", "--masks", str(masks), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        assert not out.exists()
        return err[0]

    assert "is not a folder" in refused(masks=tmp_path / "nowhere")
    assert "must lie outside --masks" in refused("--consensus-out", str(masks_dir / "consensus"))
    _write(masks_dir / "cy" / "case9.png", np.zeros((8, 8), dtype=bool))
    _write(masks_dir / "ana" / "case9.png", np.zeros((9, 8), dtype=bool))
    assert "case 'case9'" in refused() and "ana 9x8, cy 8x8" in refused()
    lonely = tmp_path / "lonely"
    _write(lonely / "ana" / "case1.png", np.zeros((8, 8), dtype=bool))
    assert "at least two reader folders" in refused(masks=lonely)


def test_agreement_help_names_the_contracted_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["agreement", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--masks" in printed and "--out" in printed and "--consensus-out" in printed
