"""``python -m core agreement``: inter-reader agreement of drawn masks (issue 16's contract)::

    python -m core agreement --masks DIR --out report.json [--consensus-out DIR2]

``DIR/<reader>/<case>.png`` (0 background, 255 region). ``report["pairwise"]`` is a list of
``{a, b, dice, iou, n_cases}`` (means over cases, with bootstrap CIs and per-case values beside them); the report
also holds each reader's STAPLE sensitivity and specificity (``report["readers"]``), the majority vote against
STAPLE and the leave-one-out human baseline. ``--consensus-out`` writes the STAPLE consensus masks (probability >
0.5) as 0/255 PNGs named by case.

Kept apart from ``services.cli`` so that it starts without loading torch (``core/__main__.py`` dispatches it here
directly, ``services.cli`` lists it through :func:`add_parser`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["add_parser", "main"]


class UsageError(ValueError):
    """A problem the user can fix; printed as ``error: ...``, exit status 2."""


def _run(args: argparse.Namespace) -> int:
    """Readers' drawn masks against each other: pairwise Dice and IoU, STAPLE consensus with each reader's
    sensitivity and specificity, majority vote and the leave-one-out human baseline, into a JSON report."""
    from core.data.store import write_atomic
    from core.metrics.agreement import agreement_report, read_mask_folder, staple, write_mask_folder

    masks_dir = Path(args.masks)
    if args.consensus_out and Path(args.consensus_out).resolve().is_relative_to(masks_dir.resolve()):
        raise UsageError("--consensus-out must lie outside --masks: a folder in there would be read as a reader")
    masks = read_mask_folder(masks_dir)
    if len(masks) < 2:
        raise UsageError(f"agreement needs at least two reader folders in {masks_dir}, found {', '.join(masks)}")
    consensus = staple(masks)
    report = {"masks": str(masks_dir)} | agreement_report(
        masks, n_boot=args.bootstrap, seed=args.seed, consensus=consensus
    )
    if args.consensus_out:
        write_mask_folder(consensus.consensus, args.consensus_out)
    write_atomic(Path(args.out), json.dumps(report, indent=2, allow_nan=False).encode())

    def shown(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    print(f"{len(masks)} readers, {len(report['cases'])} cases")
    for row in report["pairwise"]:
        scores = f"Dice {shown(row['dice'])}, IoU {shown(row['iou'])}"
        print(f"  {row['a']} vs {row['b']}: {scores} ({row['n_cases']} cases)")
    for row in report["readers"]:
        print(
            f"  {row['reader']}: STAPLE sensitivity {shown(row['sensitivity'])}, "
            f"specificity {shown(row['specificity'])}"
        )
    if consensus.incomplete:
        print(f"  no consensus for {len(consensus.incomplete)} case(s) some reader did not annotate")
    if args.consensus_out:
        print(f"STAPLE consensus of {len(consensus.cases)} cases -> {args.consensus_out}")
    print(f"report -> {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``agreement`` command to ``python -m core``'s subcommands."""
    agreement = sub.add_parser(
        "agreement", help="inter-reader agreement of drawn masks: Dice, IoU, STAPLE, majority vote, human baseline"
    )
    agreement.add_argument("--masks", required=True, help="DIR/<reader>/<case>.png: 0 background, 255 region")
    agreement.add_argument("--out", required=True, help="report.json")
    agreement.add_argument("--consensus-out", help="write the STAPLE consensus (probability > 0.5) as <case>.png here")
    agreement.add_argument("--bootstrap", type=int, default=1000, help="case resamples for the CIs")
    agreement.add_argument("--seed", type=int, default=0)
    agreement.set_defaults(run=_run)
    return agreement


def run_alone(add: Callable[[argparse._SubParsersAction], object], argv: Sequence[str] | None) -> int:
    """One command of ``python -m core`` run on its own, without the full CLI's imports: ``add`` adds it to a
    parser; errors a user can fix are one ``error: ...`` line and exit status 2, as in :mod:`services.cli`."""
    parser = argparse.ArgumentParser(prog="python -m core")
    add(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core agreement ...`` (``argv`` starts with ``agreement``)."""
    return run_alone(add_parser, argv)
