"""The concurrency benchmark runs the app's use cases under simultaneous sign-ins, exports and readers on every
backend it can start, and the app's rule leaves no errors (a correctness check: no timing is judged here)."""

import json

import pytest

from bench.concurrency import BACKENDS, OPERATIONS, main


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--rules", "new", "--backend", "both", "--out", str(out)]) == 0
    return json.loads((out / "concurrency-cpu-quick.json").read_text())


def test_every_backend_runs_the_whole_load_without_an_error(document: dict):
    assert set(document["runs"]) | {f"{b}/new" for b in document["skipped"]} == {f"{b}/new" for b in BACKENDS}
    for key, run in document["runs"].items():
        assert run["errors"] == 0, document["errors"][key]
    for row in document["rows"]:
        assert row["errors"] == 0
        assert row["done"] > 0 and row["p50_ms"] > 0 and row["max_ms"] >= row["p95_ms"] >= row["p50_ms"]
    done = {(r["backend"], r["operation"]): r["done"] for r in document["rows"]}
    for backend in {r["backend"] for r in document["rows"]}:
        assert (done[backend, "sign_in"], done[backend, "export"]) == (8, 2 * 2)  # the crowd
        assert (done[backend, "sign_in_alone"], done[backend, "export_alone"]) == (3, 1)  # the baseline
    assert {r["operation"] for r in document["rows"]} == set(OPERATIONS)
