"""Benchmark smoke tests: each benchmark's ``--quick`` run end to end on the CPU."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def run_quick(main: Callable[[Sequence[str]], int], out: Path, name: str) -> dict:
    """Run a benchmark's ``main`` with ``--quick`` on one CPU thread and return the JSON it wrote.

    One thread: a smoke test on a busy CI machine would otherwise wait at thread barriers (see bench/README.md).
    """
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / f"{name}-cpu-quick.json").read_text())
