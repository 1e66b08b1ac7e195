"""The first start: the demo accounts at once, the rest of the demo built as a background job on the cluster, part
by part, resumable."""

from __future__ import annotations

from pathlib import Path

from db import repo
from services.clips import recent_triages
from services.demo import DEMO_CLIPS, DEMO_PARTS, build_demo_part, start_first_run
from services.demo_accounts import DEMO_USERS, demo_ready, demo_workspace
from services.jobs import engine, service, store

TINY_DEMO = {
    "patients": 5,
    "specimens_per_patient": [4, 6],
    "height": 64,
    "width": 80,
    "epochs": 1,
    "image_size": 32,
    "architecture": "tiny_cnn",
    "fl_architecture": "tiny_cnn",  # the demo's own FL model (Tissue MIL at 256 px) is trained by bench.pointing
    "fl_image_size": 32,
    "rcm_mosaics": 3,
    "annotation_frames": 8,
    "rcm_side": 256,
    "rcm_window": 32,
    "rcm_patches": 24,
    "rcm_epochs": 1,
    "sample_mosaic_side": 256,
    "cle_counts": [12, 6, 6],
    "cle_size": 64,
    "cle_epochs": 1,
    "clip_frames": [40, 30],
}


def test_first_start_builds_the_demo_as_a_job_and_accounts_at_once(ray_cluster: str, workspace: Path) -> None:
    try:
        job_id = start_first_run(TINY_DEMO)
        assert job_id is not None and demo_workspace() and not demo_ready()
        # the accounts exist before the job has done anything, and their published passwords are accepted
        assert {u.username for u in repo.list_users()} >= {name for name, *_ in DEMO_USERS}
        assert start_first_run(TINY_DEMO) == job_id  # a second app process finds the running build
        job = service.wait(job_id, timeout=600)
        assert job.state == "succeeded", (job.error, job.log_tail[-3000:])
        assert job.result["built"] == [p for p in DEMO_PARTS if p != "accounts"]
        assert job.result["skipped"] == ["accounts"]
        names = {m.name for m in repo.list_models()}
        assert {"FL-CNN-tumor", "WL-CNN-tumor", "RCM-patch-aspecific"} <= names
        assert sorted(t["clip"] for t in recent_triages()) == sorted(name for name, _ in DEMO_CLIPS)
        assert demo_ready() and not (workspace / ".demo-building").exists()
        assert start_first_run(TINY_DEMO) is None  # later starts build nothing
        assert [j.id for j in store.list_jobs(kinds=("demo",))] == [job_id]
    finally:
        engine.stop_supervisor()


def test_an_interrupted_demo_build_resumes_where_it_stopped(workspace: Path) -> None:
    from services.demo import DemoConfig

    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_DEMO.items()})
    assert build_demo_part("cohort", config, log=lambda _: None) == {"built": ["cohort"], "skipped": []}
    assert build_demo_part("fl", config, log=lambda _: None, progress=None)["built"] == ["fl"]
    done = build_demo_part("fl", config, log=lambda _: None, progress=None)
    assert done == {"built": [], "skipped": ["fl"]}  # a finished part is never redone
    assert [m.name for m in repo.list_models()] == ["FL-CNN-tumor"]


def test_the_first_run_is_claimed_before_the_sign_in_page_creates_the_database(workspace: Path) -> None:
    from db.session import init_db
    from services.demo import workspace_has_data
    from services.demo_accounts import claim_first_run

    assert claim_first_run() and demo_workspace()
    init_db()  # what the sign-in page does before the app's background start looks at the workspace
    assert not workspace_has_data()  # still a demo being built, so the background start builds it
    assert claim_first_run()  # a second server process agrees


def test_a_workspace_with_other_data_is_never_claimed_for_the_demo(workspace: Path) -> None:
    from db.session import init_db
    from services.demo_accounts import claim_first_run

    init_db()
    assert not claim_first_run() and not demo_workspace()
    assert start_first_run(TINY_DEMO) is None
