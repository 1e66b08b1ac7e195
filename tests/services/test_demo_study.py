"""The demo workspace's reader study: ready to read at first sign-in, created once, added to older demo workspaces."""

from __future__ import annotations

from core.data.synth import CohortConfig, write_cohort
from db import repo
from db.session import session_scope
from services import studies
from services.demo import DEMO_STUDY, DEMO_USERS, ensure_demo_study
from services.importer import import_manifest


def test_the_demo_study_covers_the_test_split_in_fl_and_wl_for_every_demo_reader(workspace):
    manifest = write_cohort(
        CohortConfig(n_patients=4, specimens_per_patient=(4, 6), height=32, width=40, seed=3), workspace / "cohort"
    )
    assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
    ensure_demo_study(log=lambda _m: None)
    ensure_demo_study(log=lambda _m: None)  # idempotent: an existing demo workspace is only upgraded once
    with session_scope() as s:
        (study,) = studies.list_studies(s)
        test = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
        users = {u.username: u for u in repo.list_users(s)}
        readers = [users[name] for name, _, role, _ in DEMO_USERS if role == "reader"]
        assert (study.title, [a.name for a in study.arms], study.n_cases) == (DEMO_STUDY, ["FL", "WL"], len(test))
        assert not any(a.aided for a in study.arms) and not study.simulated
        assert set(study.reader_ids) == {r.id for r in readers} and len(readers) == 3
        for name, password, _, _ in DEMO_USERS:
            assert repo.authenticate(s, name, password) is not None
        assert all(studies.reader_state(s, study.id, r.id).kind == "case" for r in readers)
