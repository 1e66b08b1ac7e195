"""The demo workspace: a synthetic cohort, a patient-level split, the FL-CNN and WL-CNN, an RCM patch classifier
for whole-mosaic heatmaps (with sample mosaics to upload), and one user per role.

Built once (a marker file records completion); ``make run`` calls it with ``if_missing`` so later starts are quick.
The demo accounts and passwords are printed because they are demo data, not secrets.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from core.data.synth import CohortConfig, write_cohort
from core.data.synth_rcm import make_rcm_mosaic
from core.settings import workspace_dir
from core.train import Progress, TrainConfig
from db import repo
from db.models import Read, Specimen, Study, StudyCase, User, utcnow
from db.session import init_db, session_scope
from services import studies
from services.demo_accounts import DEMO_MARKER, DEMO_USERS, demo_ready
from services.importer import import_manifest
from services.localization import run_study
from services.mosaic import train_patch_classifier
from services.training import print_progress, train_and_register

__all__ = [
    "DEMO_STUDY",
    "SIMULATED_STUDY",
    "DEMO_USERS",
    "DemoConfig",
    "build_demo",
    "demo_ready",
    "ensure_demo_study",
    "workspace_has_data",
]

DEMO_STUDY = "FL vs WL, test split (demo)"
SIMULATED_STUDY = "FL vs WL, simulated readers (demo)"
# (username, sensitivity, specificity) per simulated reader: neurosurgeons reading specimen photos, roughly the
# operating points of the FL-CNN paper's readers; the reads are drawn at random, never given by people
SIMULATED_READERS = (("sim-reader-1", 0.82, 0.70), ("sim-reader-2", 0.88, 0.58), ("sim-reader-3", 0.76, 0.78))
_MARKER = DEMO_MARKER
_BUILDING = ".demo-building"
_DEMO_CONTENT = (
    "cohort",
    "images",
    "masks",
    "models",
    "heatmaps",
    "mosaics",
    "datasets",
    "study.db",
    "study.db-wal",
    "study.db-shm",
)


@dataclass(frozen=True)
class DemoConfig:
    patients: int = 16
    specimens_per_patient: tuple[int, int] = (50, 100)
    height: int = 256
    width: int = 320
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # 3 of 16 patients for validation, where thresholds are chosen
    epochs: int = 12
    image_size: int = 128
    seed: int = 0
    architecture: str = "efficientnet_b0"
    rcm_mosaics: int = 5  # 3 for training patches, 1 test, 1 validation
    rcm_side: int = 1024
    rcm_window: int = 128
    rcm_patches: int = 240  # per mosaic
    rcm_epochs: int = 8
    sample_mosaic_side: int = 2048  # written to cohort/mosaics/ for people to upload
    cle_counts: tuple[int, int, int] = (240, 60, 100)  # the MLCAM-LICI study at demo size (Models page)
    cle_size: int = 96
    cle_epochs: int = 8


def workspace_has_data() -> bool:
    """Whether the workspace holds a database that is not an unfinished demo build."""
    root = workspace_dir()
    return (root / "study.db").exists() and not (root / _BUILDING).exists()


def build_demo(
    config: DemoConfig = DemoConfig(),
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
) -> None:
    """Generate, import, train and register; then create the demo accounts.

    An interrupted demo build is cleaned up and started again; a workspace with other data is never touched.
    """
    root = workspace_dir()
    if workspace_has_data() and not demo_ready():
        raise RuntimeError(
            f"{root} already holds a study database that is not a demo; set IOAI_WORKSPACE to an empty folder"
        )
    if demo_ready():
        ensure_demo_study(log)
        log(f"the demo workspace in {root} is already complete")
        return
    started = time.perf_counter()
    (root / _BUILDING).touch()
    for name in _DEMO_CONTENT:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    cohort = root / "cohort"
    log(f"generating a synthetic cohort of {config.patients} patients in {cohort}")
    manifest = write_cohort(
        CohortConfig(
            n_patients=config.patients,
            specimens_per_patient=config.specimens_per_patient,
            height=config.height,
            width=config.width,
            seed=config.seed,
        ),
        cohort,
    )
    log("importing it (patient-level split {:.0%}/{:.0%}/{:.0%})".format(*config.split))
    report = import_manifest(manifest, fractions=config.split, seed=config.seed)
    for error in report.errors:
        log(f"  skipped {error}")
    log(f"imported {report.specimens} specimens, {report.images} images")
    for modality in ("FL", "WL"):
        train_and_register(
            TrainConfig(
                architecture=config.architecture,
                task="tumor",
                modality=modality,
                image_size=config.image_size,
                epochs=config.epochs,
                seed=config.seed,
            ),
            name=f"{modality}-CNN-tumor",
            log=log,
            progress=progress,
        )
    _rcm_demo(config, cohort / "mosaics", log)
    ensure_demo_study(log)
    ensure_demo_localization(config, log)
    (root / _MARKER).write_text(f"built in {time.perf_counter() - started:.0f} s\n")
    (root / _BUILDING).unlink()
    log(f"demo workspace ready in {time.perf_counter() - started:.0f} s")


def _rcm_demo(config: DemoConfig, folder: Path, log: Callable[[str], None]) -> None:
    """Train the RCM patch classifier on synthetic mosaics; write sample mosaics (and their masks) to upload."""
    log(f"generating {config.rcm_mosaics} synthetic RCM mosaics of {config.rcm_side} px for patch training")
    mosaics = [
        make_rcm_mosaic(config.rcm_side, config.rcm_side, seed=1000 + config.seed + i)
        for i in range(config.rcm_mosaics)
    ]
    train_patch_classifier(
        TrainConfig(
            architecture=config.architecture,
            task="aspecific",
            modality="RCM",
            image_size=config.rcm_window,
            epochs=config.rcm_epochs,
            seed=config.seed,
        ),
        mosaics,
        name="RCM-patch-aspecific",
        patches_per_mosaic=config.rcm_patches,
        seed=config.seed,
        log=log,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        image, mask = make_rcm_mosaic(config.sample_mosaic_side, config.sample_mosaic_side, seed=2000 + config.seed + i)
        PILImage.fromarray(image).save(folder / f"mosaic-{i + 1}.png")
        PILImage.fromarray(mask).save(folder / f"mosaic-{i + 1}-mask.png")
    log(f"sample mosaics to upload on the Diagnose page: {folder}")


DEMO_LOCALIZATION_PREFIX = "CLE-MLCAM-LICI-demo"


def ensure_demo_localization(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> None:
    """The MLCAM-LICI localisation study (seed 000's Table 2) at demo size, stored with its model, so the Models page
    has a table and example maps to show; run if missing (also upgrades older demo workspaces). About a minute."""
    init_db()
    with session_scope() as session:
        if repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-main") is not None:
            return
    log("training MLCAM-LICI and a ResNet-18 baseline on synthetic CLE frames (seed 000's Table 2, demo size)")
    run_study(
        "mlcam",
        counts=config.cle_counts,
        size=config.cle_size,
        epochs=config.cle_epochs,
        seed=config.seed,
        bootstrap=200,
        prefix=DEMO_LOCALIZATION_PREFIX,
        log=log,
        progress=None,
    )


def ensure_demo_study(log: Callable[[str], None] = print) -> None:
    """The demo accounts and the demo reader study (test-split specimens, FL and WL arms, unaided, the demo readers),
    created if missing, so a newcomer can sign in as a reader and read at once. Also upgrades older demo workspaces."""
    init_db()
    with session_scope() as session:
        users = {u.username: u for u in repo.list_users(session)}
        for username, password, role, display in DEMO_USERS:
            if username not in users:
                users[username] = repo.create_user(session, username, password, role, display)
        pi = users["pi"].id
        cases = studies.eligible_specimens(session, task="tumor", modalities=("FL", "WL"), splits=("test",))
        if cases.empty or any(s.title == DEMO_STUDY for s in studies.list_studies(session)):
            study = None
        else:
            demo_readers = {name for name, _, role, _ in DEMO_USERS if role == "reader"}
            study = studies.create_study(
                session,
                title=DEMO_STUDY,
                description="Read each specimen photo and say whether it shows tumor, with your confidence. "
                "First every fluorescence (FL) photo, then every white-light (WL) photo, each in your own order.",
                task="tumor",
                specimen_ids=[int(i) for i in cases["specimen_id"]],
                arms=[studies.ArmSpec("FL", "FL"), studies.ArmSpec("WL", "WL")],
                reader_ids=[users[name].id for name in sorted(demo_readers)],
                created_by=pi,
            )
    if study is not None:
        log(f"demo reader study {study.title!r}: {study.n_cases} cases x 2 arms, {len(study.reader_ids)} readers")
    if not cases.empty:
        _simulated_study(pi, [int(i) for i in cases["specimen_id"]], log)


def _simulated_study(pi: int, specimen_ids: list[int], log: Callable[[str], None], seed: int = 0) -> None:
    """A completed (closed) study whose reads are SIMULATED, marked so in the study, every read's ``source`` and
    the pages, so the Results page shows something real on first start. Readers are inactive accounts."""
    with session_scope() as session:
        if any(s.title == SIMULATED_STUDY for s in studies.list_studies(session)):
            return
        readers = []
        for username, _, _ in SIMULATED_READERS:
            user_id = session.scalar(select(User.id).where(User.username == username))
            if user_id is None:
                user_id = repo.add_inactive_reader(
                    session, username, f"Simulated reader {username[-1]}", "simulated-reader"
                )
            readers.append(user_id)
        study = studies.create_study(
            session,
            title=SIMULATED_STUDY,
            description="SIMULATED reads: drawn at random from the truth at fixed sensitivity and specificity per "
            "reader, for demonstrating the Results page. Not a real reader study.",
            task="tumor",
            specimen_ids=specimen_ids,
            arms=[studies.ArmSpec("FL", "FL"), studies.ArmSpec("WL", "WL")],
            reader_ids=readers,
            created_by=pi,
            simulated=True,
        )
        truth = studies.export_cases(session, study.id).set_index("case_id")["truth"]
        cases = dict(
            session.execute(
                select(Specimen.code, StudyCase.id)
                .join(StudyCase, StudyCase.specimen_id == Specimen.id)
                .where(StudyCase.study_id == study.id)
            ).all()
        )
        rng = np.random.default_rng(seed)
        now = utcnow()
        for arm in study.arms:
            for reader_id, (_, sensitivity, specificity) in zip(readers, SIMULATED_READERS, strict=True):
                for code, case_id in cases.items():
                    positive = truth[code] == 1
                    correct = rng.random() < (sensitivity if positive else specificity)
                    label = int(positive) if correct else int(not positive)
                    rating = int(rng.choice([3, 4, 5], p=[0.2, 0.4, 0.4]) if correct else rng.choice([1, 2, 3, 4]))
                    session.add(
                        Read(
                            study_id=study.id,
                            arm_id=arm.id,
                            case_id=case_id,
                            reader_id=reader_id,
                            label=label,
                            rating=rating,
                            answered_at=now,
                            duration_s=float(rng.uniform(4.0, 30.0)),
                            source="simulated",
                        )
                    )
        session.flush()
        session.get(Study, study.id).frozen_at = now
        studies.set_status(session, study.id, "closed", user_id=pi)
    log(f"demo study with SIMULATED reads {SIMULATED_STUDY!r}: {len(cases)} cases x 2 arms x 3 simulated readers")
