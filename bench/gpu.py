"""Every GPU-capable benchmark with ``--device cuda``, in one call: ``python -m bench.gpu [--out DIR] [--quick]``.

Meant for a lent GPU machine (the ``device`` tool runs one command with a time limit): each benchmark runs as its own
process, one after the other, with a time budget (``--budget`` seconds in all, shared out by the weights below), and
writes its JSON into ``--out`` (``$OUT`` on the device machine, so the results come back); its terminal output is kept
as ``<name>.log`` beside it. A benchmark that fails or runs out of time is reported and the next one runs. Exit status
1 when CUDA is missing, else 0 with a summary line per benchmark.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BENCHMARKS", "main"]

ROOT = Path(__file__).resolve().parent.parent
# name -> (module arguments, share of the time budget, --out names a file rather than a folder)
BENCHMARKS: dict[str, tuple[list[str], float, bool]] = {
    "diagnosis": (["-m", "bench.diagnosis"], 0.13, False),
    "heatmaps": (["-m", "bench.heatmaps"], 0.22, False),
    "clips": (["-m", "bench.clips"], 0.17, False),
    "live": (["-m", "bench.live"], 0.13, False),
    "mosaic": (["-m", "bench.mosaic"], 0.22, False),
    "models": (["-m", "bench.models"], 0.13, True),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all benchmarks together (540)")
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="these benchmarks only")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {name: BENCHMARKS[name] for name in (args.only or BENCHMARKS)}
    total = sum(share for _, share, _ in chosen.values())
    for name, (module, share, out_is_file) in chosen.items():
        limit = args.budget * share / total
        out = args.out / f"{name}-cuda.json" if out_is_file else args.out
        command = [sys.executable, *module, "--device", "cuda", "--out", str(out), *(["--quick"] * args.quick)]
        began = time.perf_counter()
        with open(args.out / f"{name}.log", "wb") as log:
            try:
                code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
                outcome = "ok" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                outcome = f"stopped after {limit:.0f} s (its budget)"
        print(f"{name}: {outcome} in {time.perf_counter() - began:.0f} s (log: {args.out / f'{name}.log'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
