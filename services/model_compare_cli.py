"""``python -m core compare-models``: two registered models of one task on the same specimens (Table 2, Fig. 4 of
the FL-CNN paper)::

    python -m core compare-models MODEL_A MODEL_B [--split test] [--out DIR] [--seed 0]

Both models score the split's specimens that have the task's label and an image in each model's modality (missing
scores are computed and stored first); each decides at its registered threshold. ``DIR`` receives ``table.csv``
(Table 2: each metric per model with its 95 % bootstrap CI, the difference and its p-values; neutralised against
spreadsheet formulas), ``report.json`` (everything, the paired specimens' scores included) and ``figure.png``
(Fig. 4: grouped bars with CI error bars). The table is printed too. See :mod:`services.model_compare`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from services.agreement_cli import run_alone

__all__ = ["add_parser", "main", "run"]


def run(args: argparse.Namespace) -> int:
    """Compare the two models, write the table, the report and the figure into ``--out``, print the table."""
    import pandas as pd

    from core.data.store import write_atomic
    from db.session import init_db
    from services.model_compare import compare_models, comparison_png, comparison_table, table_csv

    init_db()
    report = compare_models(
        args.model_a,
        args.model_b,
        split=args.split,
        resamples=args.bootstrap,
        permutations=args.permutations,
        seed=args.seed,
        progress=lambda message: print(message, flush=True),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.csv", table_csv(report))
    write_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False).encode())
    write_atomic(out / "figure.png", comparison_png(report))
    a, b = report["models"]["a"], report["models"]["b"]
    print(
        f"{report['task']}: {a['name']} ({a['modality']}, threshold {a['threshold']:.3f}) vs {b['name']} "
        f"({b['modality']}, threshold {b['threshold']:.3f}) on {report['n_cases']} {report['split']} specimens "
        f"({report['n_positive']} positive)"
    )
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(comparison_table(report).to_string(index=False))
    print(f"table -> {out / 'table.csv'}, report -> {out / 'report.json'}, figure -> {out / 'figure.png'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare-models`` command to ``python -m core``'s subcommands."""
    compare = sub.add_parser(
        "compare-models",
        help="two models of one task on the same specimens: Table 2 with CIs and paired tests, Fig. 4",
    )
    compare.add_argument("model_a", metavar="MODEL_A", help="name or id of a registered model (e.g. the FL-CNN)")
    compare.add_argument("model_b", metavar="MODEL_B", help="name or id of a model of the same task (e.g. the WL-CNN)")
    compare.add_argument("--split", choices=("train", "val", "test"), default="test")
    compare.add_argument("--out", default="compare-models", help="folder for table.csv, report.json and figure.png")
    compare.add_argument("--bootstrap", type=int, default=1000, help="specimen resamples for the CIs")
    compare.add_argument("--permutations", type=int, default=10000, help="for the paired permutation tests")
    compare.add_argument("--seed", type=int, default=0)
    compare.set_defaults(run=run)
    return compare


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core compare-models ...`` on its own (``argv`` starts with ``compare-models``)."""
    return run_alone(add_parser, argv)
