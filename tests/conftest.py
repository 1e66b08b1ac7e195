"""Shared fixtures: an isolated workspace with a tiny imported cohort and a tiny registered model."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.settings import environment, pointing_at

torch.set_num_threads(2)


def copy_workspace(source: Path, target: Path) -> None:
    """Files copied; the database through SQLite's backup (consistent even while another connection has it open)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("study.db*"))
    with (
        contextlib.closing(sqlite3.connect(source / "study.db")) as src,
        contextlib.closing(sqlite3.connect(target / "study.db")) as dst,
    ):
        src.backup(dst)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models gain
    nothing from intra-op threads, and on a busy shared CPU a second thread makes every layer wait at a barrier
    (a training step here took 24 s instead of 0.4 s next to another job); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Streamlit's AppTest installs the page script as ``__main__`` and leaves it there; a later ``spawn`` worker
    (bench.mosaic's memory probe) would then re-run that page script and die, and its pool would hang."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh empty workspace folder with its own SQLite database."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    return root


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for this test session (see tests/postgres.py)."""
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace with a 4-patient synthetic cohort imported and a tiny FL model and WL model registered.

    Session-scoped (training takes a few seconds); tests may add uploads and predictions, never change the
    cohort or the models. The environment points at it only while it is built; tests select it with
    ``use_trained``.
    """
    from core.data.synth import CohortConfig, write_cohort
    from core.train import TrainConfig
    from services.importer import import_manifest
    from services.training import train_and_register

    root = tmp_path_factory.mktemp("trained_ws")
    with pointing_at(root):
        manifest = write_cohort(
            CohortConfig(n_patients=4, specimens_per_patient=(10, 14), height=64, width=80, seed=1), root / "cohort"
        )
        report = import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0)
        assert not report.errors
        for modality in ("FL", "WL"):
            train_and_register(
                TrainConfig(architecture="tiny_cnn", modality=modality, image_size=32, epochs=2, batch_size=8),
                name=f"tiny-{modality}",
                log=lambda _msg: None,
            )
    yield root


@pytest.fixture
def use_trained(trained_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the settings at the shared trained workspace for one test."""
    monkeypatch.setenv("IOAI_WORKSPACE", str(trained_workspace))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{trained_workspace / 'study.db'}")
    return trained_workspace


@pytest.fixture(scope="session")
def rcm_workspace(tmp_path_factory):
    """A workspace with a tiny RCM patch classifier (32 px windows) and one 256 px mosaic PNG to upload."""
    from PIL import Image as PILImage

    from core.data.synth_rcm import make_rcm_mosaic
    from core.train import TrainConfig
    from services.mosaic import train_patch_classifier

    root = tmp_path_factory.mktemp("rcm_ws")
    with pointing_at(root):
        mosaics = [make_rcm_mosaic(256, 256, seed=50 + i, blobs=3) for i in range(4)]
        info, _ = train_patch_classifier(
            TrainConfig(
                architecture="tiny_cnn", task="aspecific", modality="RCM", image_size=32, epochs=3, batch_size=16
            ),
            mosaics,
            name="tiny-RCM",
            patches_per_mosaic=96,
            log=lambda _m: None,
        )
        image, mask = make_rcm_mosaic(256, 256, seed=99, blobs=3)
        PILImage.fromarray(image).save(root / "mosaic.png")
        PILImage.fromarray(mask).save(root / "mosaic-mask.png")
    return root, info


def train_tiny_rcm(name: str):
    """A tiny RCM patch classifier (32 px windows, one epoch on three 128 px mosaics) registered in the current
    workspace as ``name``; its ModelInfo. For tests that need a mosaic model, not a good one."""
    from core.data.synth_rcm import make_rcm_mosaic
    from core.train import TrainConfig
    from services.mosaic import train_patch_classifier

    info, _ = train_patch_classifier(
        TrainConfig(architecture="tiny_cnn", task="aspecific", modality="RCM", image_size=32, epochs=1),
        [make_rcm_mosaic(128, 128, seed=50 + i, blobs=3) for i in range(3)],
        name=name,
        patches_per_mosaic=48,
        log=lambda _: None,
    )
    return info


@pytest.fixture
def in_rcm(rcm_workspace, monkeypatch):
    root, info = rcm_workspace
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    return root, info


def signs_in(session, username: str, password: str):
    """The account these credentials open, or None: active, and the password verifies (the checks of
    ``services.accounts.sign_in`` without its throttling or audit rows, for tests that only ask whether)."""
    from db import repo

    found = repo.find_credentials(session, username)
    usable = found is not None and found.user.active
    return found.user if repo.verify_password(found.password_hash if usable else None, password) else None


def reader_study(n_readers: int = 2, **options):
    """A fresh PI, ``n_readers`` readers and a study over the current workspace's test-split FL and WL images (arms FL
    then WL unless ``arms=`` is given), all with unique names. Returns ``(study, pi id, reader ids)``."""
    import uuid

    from db import repo
    from db.session import init_db, session_scope
    from services import studies

    init_db()
    tag = uuid.uuid4().hex[:8]
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{tag}", "pw-pi-123", "pi").id
        readers = [repo.create_user(s, f"r{i}-{tag}", "pw-reader-1", "reader").id for i in range(n_readers)]
        cases = studies.eligible_specimens(s, task="tumor", modalities=("FL", "WL"), splits=("test",))
        study = studies.create_study(
            s,
            title=f"Study {tag}",
            task="tumor",
            specimen_ids=[int(i) for i in cases["specimen_id"]],
            arms=options.pop("arms", (studies.ArmSpec("FL", "FL"), studies.ArmSpec("WL", "WL"))),
            reader_ids=readers,
            created_by=pi,
            **options,
        )
    return study, pi, readers


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local Ray cluster for this test session (the engine's embedded one, in its own folder), attached
    through ``IOAI_RAY_ADDRESS`` as a deployment would be; stopped at the end."""
    from services.jobs import engine

    root = tmp_path_factory.mktemp("ray")
    address = engine.start_embedded(root, cpus=4)
    try:
        with environment(**{engine.ADDRESS_ENV: address}):
            yield address
    finally:
        engine.disconnect()
        engine.stop_embedded(root)


@pytest.fixture
def cohort_workspace(workspace: Path) -> Path:
    """A fresh workspace with a tiny 4-patient synthetic cohort imported (no models)."""
    from core.data.synth import CohortConfig, write_cohort
    from services.importer import import_manifest

    manifest = write_cohort(
        CohortConfig(n_patients=4, specimens_per_patient=(10, 14), height=64, width=80, seed=1), workspace / "cohort"
    )
    assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
    return workspace


# a CLE cohort as write_cle_cohort writes it for the frames workspace (tests recompute its clips from these)
FRAMES_COHORT = {"patients": 3, "sites_per_patient": 2, "frames_per_clip": 40, "size": 64, "step": 4}


@pytest.fixture(scope="session")
def frame_cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The manifests of a synthetic CLE cohort (clips of biopsy sites, per-stretch labels) and of four RCM mosaics."""
    from core.data.synth_cle import write_cle_cohort
    from core.data.synth_rcm import write_rcm_cohort

    root = tmp_path_factory.mktemp("cohorts")
    return write_cle_cohort(root / "cle", **FRAMES_COHORT), write_rcm_cohort(root / "rcm", mosaics=4, size=160)


@pytest.fixture(scope="session")
def frames_workspace(tmp_path_factory: pytest.TempPathFactory, frame_cohorts) -> tuple[Path, dict[str, Any]]:
    """A workspace with both cohorts imported, a tiny MLCAM-LICI frame model and a tiny RCM patch classifier:
    (root, {"CLE": model info, "RCM": model info})."""
    from core.data.localization_set import generate_set
    from core.train import TrainConfig
    from db.session import init_db
    from services.importer import import_manifest
    from services.localization import train_on_set

    root = tmp_path_factory.mktemp("frames_ws")
    with pointing_at(root):
        init_db()
        for manifest in frame_cohorts:
            assert not import_manifest(manifest).errors
        cle_set = generate_set("cle", root / "set", counts=(16, 8, 8), size=FRAMES_COHORT["size"], seed=3)
        config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
        cle_model, _ = train_on_set(config, cle_set, name="tiny-MLCAM", log=lambda _: None)
        rcm_model = train_tiny_rcm("tiny-RCM")
    return root, {"CLE": cle_model, "RCM": rcm_model}


@pytest.fixture
def in_frames(frames_workspace, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Point the settings at the shared frames workspace for one test; its models."""
    root, models = frames_workspace
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    return models


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """file name -> the callable a page registered for that download button (the latest run's)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    caught: dict[str, Any] = {}
    register = MediaFileManager.add_deferred

    def catch(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        caught[file_name] = data_callable
        return register(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", catch)
    return caught


@pytest.fixture(scope="session")
def cascade_workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace with a 6-patient synthetic cohort in which half the tumors are GBM (the default rate leaves a tiny
    cohort without any), and tiny FL and WL models of each cascade task: tumor, grade and Ki-67, registered in that
    order as ``casc-<modality>-<task>``, plus an FL grade model ``casc-FL-grade-older`` registered before the others
    (Diagnose takes the newest of a task). Session-scoped; tests may add uploads and predictions, never models."""
    from core.data.synth import CohortConfig, write_cohort
    from core.train import TrainConfig
    from services.importer import import_manifest
    from services.training import train_and_register

    root = tmp_path_factory.mktemp("cascade_ws")
    with pointing_at(root):
        manifest = write_cohort(
            CohortConfig(n_patients=6, specimens_per_patient=(8, 10), height=64, width=80, gbm_rate=0.5, seed=3),
            root / "cohort",
        )
        assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
        config = {"architecture": "tiny_cnn", "image_size": 32, "epochs": 2, "batch_size": 8}
        train_and_register(
            TrainConfig(task="grade", modality="FL", seed=1, **config), name="casc-FL-grade-older", log=lambda _m: None
        )
        for task in ("tumor", "grade", "ki67"):
            for modality in ("FL", "WL"):
                train_and_register(
                    TrainConfig(task=task, modality=modality, **config),
                    name=f"casc-{modality}-{task}",
                    log=lambda _m: None,
                )
    yield root


@pytest.fixture
def use_cascade(cascade_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the settings at the shared cascade workspace for one test."""
    monkeypatch.setenv("IOAI_WORKSPACE", str(cascade_workspace))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{cascade_workspace / 'study.db'}")
    return cascade_workspace


@pytest.fixture
def cascade_copy(cascade_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the cascade workspace (tiny FL and WL models of tumor, grade and Ki-67) for a test that
    adds jobs or stored results, which later copies of the shared one would otherwise carry."""
    root = tmp_path / "ws"
    copy_workspace(cascade_workspace, root)
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    return root
