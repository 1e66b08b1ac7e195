"""The demo workspace's reader study: ready to read at first sign-in, created once, added to older demo workspaces."""

from __future__ import annotations

from core.data.synth import CohortConfig, write_cohort
from db import repo
from db.session import session_scope
from services import studies
from services.demo import DEMO_STUDY, DEMO_USERS, SIMULATED_READERS, SIMULATED_STUDY, ensure_demo_study
from services.importer import import_manifest
from tests.conftest import signs_in


def test_the_demo_study_covers_the_test_split_in_fl_and_wl_for_every_demo_reader(workspace):
    manifest = write_cohort(
        CohortConfig(n_patients=4, specimens_per_patient=(4, 6), height=32, width=40, seed=3), workspace / "cohort"
    )
    assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
    ensure_demo_study(log=lambda _m: None)
    ensure_demo_study(log=lambda _m: None)  # idempotent: an existing demo workspace is only upgraded once
    with session_scope() as s:
        by_title = {x.title: x for x in studies.list_studies(s)}
        study, simulated = by_title[DEMO_STUDY], by_title[SIMULATED_STUDY]
        test = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
        users = {u.username: u for u in repo.list_users(s)}
        readers = [users[name] for name, _, role, _ in DEMO_USERS if role == "reader"]
        assert (study.title, [a.name for a in study.arms], study.n_cases) == (DEMO_STUDY, ["FL", "WL"], len(test))
        assert not any(a.aided for a in study.arms) and not study.simulated
        assert set(study.reader_ids) == {r.id for r in readers} and len(readers) == 3
        for name, password, _, _ in DEMO_USERS:
            assert signs_in(s, name, password) is not None
        assert all(studies.reader_state(s, study.id, r.id).kind == "case" for r in readers)
        assert len(by_title) == 2
    # the completed study with SIMULATED reads, marked as such everywhere
    assert simulated.simulated and simulated.status == "closed" and simulated.frozen
    assert "SIMULATED" in simulated.description and set(simulated.reader_ids).isdisjoint(study.reader_ids)
    with session_scope() as s:
        reads = studies.export_reads(s, simulated.id)
        assert len(reads) == simulated.n_cases * 2 * len(SIMULATED_READERS) and set(reads["source"]) == {"simulated"}
        for name, _, _ in SIMULATED_READERS:
            assert signs_in(s, name, "") is None  # inactive: nobody signs in as a simulated reader
