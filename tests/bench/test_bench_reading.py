"""The reader-study benchmark builds its databases, serves and records reads end to end on every backend it can
start, and writes every figure (timings are not judged here)."""

import json
import math

import pytest

from bench.reading import BACKENDS, MEASUREMENTS, main

FIGURES = ("p50_ms", "p95_ms", "mean_ms", "max_ms")


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A ``--quick`` run on both backends (PostgreSQL only where its server binaries are installed)."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--backend", "both", "--out", str(out)]) == 0
    return json.loads((out / "reading-cpu-quick.json").read_text())


def test_every_backend_is_measured_or_skipped_with_the_reason(document: dict):
    settings = document["settings"]
    assert (settings["readers"], settings["cases"], settings["requests"]) == (3, 20, 10)
    assert "sqlite" in document["databases"]
    assert set(document["databases"]) | set(document["skipped"]) == set(BACKENDS)
    assert not set(document["databases"]) & set(document["skipped"])
    for reason in document["skipped"].values():
        assert "binaries" in reason
    for backend, about in document["databases"].items():
        assert about["server"].startswith({"sqlite": "SQLite", "postgresql": "PostgreSQL"}[backend])
        assert 0 < about["reads_prefilled"] <= 3 * (2 * 20 - 1)  # every reader has a case left
        assert about["audit_events_prefilled"] == about["reads_prefilled"] + 1  # one per read, and the set-up
        assert about["setup_seconds"] > 0 and about["measure_seconds"] > 0


def test_rows_give_positive_finite_percentiles_for_serve_and_record(document: dict):
    rows = document["rows"]
    for backend in document["databases"]:
        mine = {(r["measurement"], r["image"]): r for r in rows if r["backend"] == backend}
        assert set(mine) == {
            ("serve_sql", None),
            ("encode", "64x80"),
            ("encode_cached", "64x80"),
            ("serve", "64x80"),
            ("serve_cached", "64x80"),
            ("record", None),
        }
        for row in mine.values():
            assert row["label"] == MEASUREMENTS[row["measurement"]] and row["requests"] == 10
            assert all(math.isfinite(row[key]) and row[key] > 0 for key in FIGURES), row
            assert row["p50_ms"] <= row["p95_ms"] <= row["max_ms"]
        sql, encode, serve = mine["serve_sql", None], mine["encode", "64x80"], mine["serve", "64x80"]
        assert serve["mean_ms"] == pytest.approx(sql["mean_ms"] + encode["mean_ms"])  # per-request sums
        assert serve["sql_share"] == pytest.approx(sql["mean_ms"] / serve["mean_ms"])
        assert sql["statements"] >= 5 and mine["record", None]["statements"] > sql["statements"]
        assert encode["statements"] is None and encode["sql_share"] is None
        cached = mine["serve_cached", "64x80"]
        assert cached["mean_ms"] == pytest.approx(sql["mean_ms"] + mine["encode_cached", "64x80"]["mean_ms"])
