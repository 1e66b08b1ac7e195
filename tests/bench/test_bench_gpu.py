"""bench.gpu: every benchmark it runs takes the flags it is given, and without CUDA it says so and stops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench.gpu import BENCHMARKS, ROOT, main


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_takes_device_out_and_quick(name):
    module, share, _ = BENCHMARKS[name]
    shown = subprocess.run([sys.executable, *module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for flag in ("--device", "--out", "--quick"):
        assert flag in shown.stdout, f"{name} has no {flag}"
    assert "cuda" in shown.stdout and 0 < share < 1


def test_the_shares_split_the_whole_budget():
    assert sum(share for _, share, _ in BENCHMARKS.values()) == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_with_a_message(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--quick"]) == 1
    assert "no CUDA device here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
