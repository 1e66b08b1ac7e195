"""The mosaic benchmark's parity section (``--parity``) runs end to end on the CPU and writes every figure."""

import json
import math
from pathlib import Path

import pytest
import torch

from bench.mosaic import main, parse_args


def test_quick_parity_trains_every_scheme_and_scores_loop_against_the_whole_trunk(tmp_path: Path):
    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--parity", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads((tmp_path / "mosaic-cpu-quick.json").read_text())
    assert document["settings"]["parity"] and document["settings"]["parity_context"] == 32
    assert document["settings"]["parity_padded_fraction"] == 0.5
    assert document["settings"]["parity_schemes"] == ["plain", "context", "mixed"]

    parity = document["parity"]
    assert parity["architecture"] == "efficientnet_b2" and parity["window"] == 64 and parity["stride"] == 32
    assert parity["mosaic"] == [192, 192] and parity["train_mosaics"] == {"train": [1, 3], "val": [4]}
    schemes = parity["schemes"]
    assert list(schemes) == ["plain", "context", "mixed"]
    assert [(about["context"], about["padded_fraction"]) for about in schemes.values()] == [
        (0, 0.0),
        (32, 0.0),
        (32, 0.5),
    ]
    for about in schemes.values():
        assert about["train_patches"] == 32 and 0.0 <= about["val_auc"] <= 1.0 and about["train_seconds"] > 0

    # quick: step 32 only, a multiple of B2's stride, so one trunk pass; 5 x 5 windows of 64 px over 192 px
    assert [(row["scheme"], row["step"], row["phases"]) for row in parity["rows"]] == [
        ("plain", 32, 1),
        ("context", 32, 1),
        ("mixed", 32, 1),
    ]
    for row in parity["rows"]:
        assert row["windows"] == 25
        assert 0.0 <= row["auc_loop"] <= 1.0 and 0.0 <= row["auc_fast"] <= 1.0
        assert row["auc_gap"] == row["auc_loop"] - row["auc_fast"]
        assert row["loop_over_fast"] == row["seconds_loop"] / row["seconds_fast"] > 0
        assert 0.0 <= row["mean_abs"] <= row["max_abs"] <= 1.0

    memory = parity["memory"]
    assert memory["size"] == document["settings"]["big_size"] == 512
    assert (memory["share"], memory["window"], memory["step"]) == (None, 64, 32)
    assert math.isfinite(memory["seconds"]) and memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0


def test_parity_schemes_and_padded_fraction_are_chosen_on_the_command_line(capsys):
    settings = parse_args(["--quick", "--parity", "--schemes", "mixed,plain", "--padded-fraction", "0.25"])
    assert settings.parity_schemes == ("plain", "mixed") and settings.parity_padded_fraction == 0.25
    assert parse_args(["--quick"]).parity_schemes == ("plain", "context", "mixed")
    for flags, words in [
        (["--schemes", "plain,padded"], "schemes are plain, context, mixed, not 'plain,padded'"),
        (["--padded-fraction", "0"], "--padded-fraction must be above 0 and at most 1"),
        (["--padded-fraction", "1.5"], "--padded-fraction must be above 0 and at most 1"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--quick", "--parity", *flags])
        assert words in capsys.readouterr().err
