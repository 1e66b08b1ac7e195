"""The demo workspace: a synthetic cohort, a patient-level split, the FL-CNN and WL-CNN, an RCM patch classifier
for whole-mosaic heatmaps (with sample mosaics to upload), reader studies, the MLCAM-LICI study on synthetic CLE
frames, synthetic CLE clips triaged by its model, and one user per role.

Built in parts (:data:`DEMO_PARTS`, in that order: accounts, cohort, FL-CNN first, ...); each part is skipped when it
is already there, so an interrupted build resumes where it stopped and each part is usable as it lands. ``make run``
serves the app at once and builds the parts as a background job (:func:`start_first_run`); ``python -m core demo``
builds them in the foreground. A marker file records completion. The demo accounts and passwords are printed
because they are demo data, not secrets.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.synth import CohortConfig, write_cohort
from core.data.synth_cle import make_cle_clip, write_clip
from core.data.synth_rcm import make_rcm_mosaic
from core.settings import workspace_dir
from core.train import Progress, TrainConfig
from db import repo
from db.models import Clip, ClipTriage, Read, Specimen, Study, StudyCase, User, utcnow
from db.session import init_db, session_scope
from services import studies
from services.clips import triage_and_store
from services.demo_accounts import DEMO_BUILDING, DEMO_MARKER, DEMO_USERS, demo_ready
from services.demo_annotation import annotation_done, ensure_demo_annotation
from services.importer import import_manifest
from services.localization import run_study
from services.mosaic import train_patch_classifier
from services.predictions import cached_predictor
from services.training import print_progress, train_and_register

__all__ = [
    "DEMO_CLIPS",
    "DEMO_CLIP_OWNER",
    "DEMO_PARTS",
    "DEMO_STUDY",
    "SIMULATED_STUDY",
    "DEMO_USERS",
    "DemoConfig",
    "build_demo",
    "build_demo_part",
    "ensure_demo_accounts",
    "ensure_demo_clips",
    "ensure_demo_regions",
    "demo_ready",
    "ensure_demo_study",
    "start_first_run",
    "workspace_has_data",
]

DEMO_STUDY = "FL vs WL, test split (demo)"
SIMULATED_STUDY = "FL vs WL, simulated readers (demo)"
# (username, sensitivity, specificity) per simulated reader: neurosurgeons reading specimen photos, roughly the
# operating points of the FL-CNN paper's readers; the reads are drawn at random, never given by people
SIMULATED_READERS = (("sim-reader-1", 0.82, 0.70), ("sim-reader-2", 0.88, 0.58), ("sim-reader-3", 0.76, 0.78))
_MARKER = DEMO_MARKER
_BUILDING = DEMO_BUILDING
_DEMO_CONTENT = (
    "cohort",
    "images",
    "masks",
    "models",
    "heatmaps",
    "mosaics",
    "datasets",
    "clips",
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
    # CohortConfig.confounders: 1 the honest FL cohort (non-specific vessels, clots, reactive uptake, glare, uneven
    # excitation: the brightest spot is not the tumor); 0 the early one, where the tumor was simply the brightest region
    confounders: float = 1.0
    epochs: int = 12  # the WL-CNN's
    image_size: int = 128  # the WL-CNN's
    seed: int = 0
    architecture: str = "efficientnet_b0"  # the WL-CNN's and the RCM patch classifier's
    # The FL-CNN's own settings (issue 17); None: the WL-CNN's above. The paper's EfficientNet-B0 (and ResNet-18,
    # finer maps, max pooling) learned the honest cohort's label but not where it comes from: its Grad-CAM peak lay
    # in the tumor for at most half the test tumor specimens. Tissue MIL (core.models.flmil: local cell scores over
    # the specimen, top-k pooled) at 256 px does both (bench.pointing, bench/README.md).
    fl_architecture: str | None = "flmil"
    fl_image_size: int | None = 256
    fl_epochs: int | None = None
    fl_batch_size: int | None = None
    # builder options of the FL-CNN as (name, value) pairs, e.g. (("top_k", 0.2),)
    fl_model_options: tuple[tuple[str, Any], ...] = ()
    fl_augment: bool = True  # False: the FL-CNN trains without its recipe's augmentation
    fl_seed: int | None = None  # the FL-CNN's training seed; None: ``seed`` (which also draws the cohort and split)
    rcm_mosaics: int = 5  # 3 for training patches, 1 test, 1 validation
    rcm_side: int = 1024
    rcm_window: int = 128
    rcm_patches: int = 240  # per mosaic
    rcm_epochs: int = 8
    sample_mosaic_side: int = 2048  # written to cohort/mosaics/ for people to upload
    cle_counts: tuple[int, int, int] = (240, 60, 100)  # the MLCAM-LICI study at demo size (Models page)
    cle_size: int = 96
    cle_epochs: int = 8
    clip_frames: tuple[int, int] = (160, 100)  # frames of each of DEMO_CLIPS, at cle_size px and 20 frames/s
    annotation_frames: int = 24  # synthetic CLE frames of the regions studies, half diagnostic


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
    build_demo_part("all", config, log=log, progress=progress)
    log(f"demo workspace ready in {time.perf_counter() - started:.0f} s")


DEMO_PARTS = {  # in build order: the FL-CNN, the first thing a surgeon uses, comes right after the cohort
    "accounts": "demo accounts",
    "cohort": "synthetic cohort (generated and imported)",
    "fl": "FL-CNN (tumor, fluorescence)",
    "study": "reader studies",
    "wl": "WL-CNN (tumor, white light)",
    "rcm": "RCM patch classifier and sample mosaics",
    "localization": "MLCAM-LICI localisation study (CLE)",
    "clips": "synthetic CLE clips triaged by MLCAM-LICI",
    "annotation": "regions studies on CLE frames (SIMULATED annotators, and one for the demo readers)",
}
_PART_WEIGHTS = {
    "accounts": 1, "cohort": 8, "fl": 28, "study": 2, "wl": 28, "rcm": 18, "localization": 15, "clips": 2,
    "annotation": 2,
}  # fmt: skip


def _part_done(part: str) -> bool:
    init_db()
    with session_scope() as session:
        if part == "accounts":
            names = {u.username for u in repo.list_users(session)}
            return all(name in names for name, *_ in DEMO_USERS)
        if part == "cohort":
            return session.scalar(select(Specimen.id).limit(1)) is not None
        if part in ("fl", "wl"):
            return repo.find_model(session, f"{part.upper()}-CNN-tumor") is not None
        if part == "study":
            titles = {s.title for s in studies.list_studies(session)}
            return DEMO_STUDY in titles and SIMULATED_STUDY in titles
        if part == "rcm":
            return repo.find_model(session, "RCM-patch-aspecific") is not None
        if part == "clips":
            return not _missing_clips(session)
        if part == "annotation":
            return annotation_done()
        return repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-main") is not None


def _build_part(
    part: str, config: DemoConfig, log: Callable[[str], None], progress: Callable[[Progress], None] | None
) -> None:
    root = workspace_dir()
    cohort = root / "cohort"
    if part == "accounts":
        ensure_demo_accounts()
        log("demo accounts ready: " + ", ".join(name for name, *_ in DEMO_USERS))
    elif part == "cohort":
        shutil.rmtree(cohort, ignore_errors=True)  # nothing was imported: a half-written cohort is redone
        log(f"generating a synthetic cohort of {config.patients} patients in {cohort}")
        manifest = write_cohort(
            CohortConfig(
                n_patients=config.patients,
                specimens_per_patient=config.specimens_per_patient,
                height=config.height,
                width=config.width,
                confounders=config.confounders,
                seed=config.seed,
            ),
            cohort,
        )
        log("importing it (patient-level split {:.0%}/{:.0%}/{:.0%})".format(*config.split))
        report = import_manifest(manifest, fractions=config.split, seed=config.seed)
        for error in report.errors:
            log(f"  skipped {error}")
        log(f"imported {report.specimens} specimens, {report.images} images")
    elif part == "fl":
        train_and_register(
            TrainConfig(
                architecture=config.fl_architecture or config.architecture,
                task="tumor",
                modality="FL",
                image_size=config.fl_image_size or config.image_size,
                epochs=config.fl_epochs or config.epochs,
                batch_size=config.fl_batch_size or TrainConfig.batch_size,
                seed=config.seed if config.fl_seed is None else config.fl_seed,
                model_kwargs=dict(config.fl_model_options),
                augment=config.fl_augment,
            ),
            name="FL-CNN-tumor",
            log=log,
            progress=progress,
        )
    elif part == "wl":
        train_and_register(
            TrainConfig(
                architecture=config.architecture,
                task="tumor",
                modality="WL",
                image_size=config.image_size,
                epochs=config.epochs,
                seed=config.seed,
            ),
            name="WL-CNN-tumor",
            log=log,
            progress=progress,
        )
    elif part == "study":
        ensure_demo_study(log)
    elif part == "rcm":
        _rcm_demo(config, cohort / "mosaics", log, progress)
    elif part == "localization":
        ensure_demo_localization(config, log)
    elif part == "clips":
        ensure_demo_clips(config, log)
    else:
        ensure_demo_regions(config, log)


def build_demo_part(
    part: str,
    config: DemoConfig = DemoConfig(),
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
    report: Callable[[float, float, str], None] | None = None,
) -> dict[str, list[str]]:
    """Build one part of the demo (``"all"``: every part in order, then mark the workspace complete), skipping
    what is already there. ``report(start, end, message)`` hears which share of the whole build each part is.
    Returns the parts built and skipped."""
    parts = list(DEMO_PARTS) if part == "all" else [part]
    total = sum(_PART_WEIGHTS[p] for p in parts)
    built, skipped, done = [], [], 0.0
    for name in parts:
        if report:
            report(done / total, (done + _PART_WEIGHTS[name]) / total, f"demo: {DEMO_PARTS[name]}")
        if _part_done(name):
            skipped.append(name)
        else:
            log(f"demo: building the {DEMO_PARTS[name]}")
            _build_part(name, config, log, progress)
            built.append(name)
        done += _PART_WEIGHTS[name]
    if part == "all":
        root = workspace_dir()
        (root / _MARKER).write_text("complete\n")
        (root / _BUILDING).unlink(missing_ok=True)
    return {"built": built, "skipped": skipped}


def start_first_run(settings: dict[str, object] | None = None) -> int | None:
    """The app's first start in an empty workspace (or one whose demo build stopped): mark it a demo workspace,
    create the demo accounts at once, and build the rest as a background job; the job's id (None when the
    workspace is a complete demo or holds other data). Called by the app when ``IOAI_DEMO=1`` (``make run``);
    ``settings`` are :class:`DemoConfig` fields (a smaller demo)."""
    root = workspace_dir()
    if demo_ready() or workspace_has_data():
        return None
    (root / _BUILDING).touch()
    init_db()
    ensure_demo_accounts()
    from services.jobs import service, store

    active = store.list_jobs(states=store.ACTIVE, kinds=("demo",), limit=1)
    if active:
        return active[0].id
    return service.submit("demo", {**(settings or {}), "part": "all"}, user_id=None)


def ensure_demo_accounts() -> dict[str, User]:
    """The demo accounts, created if missing: username -> user."""
    init_db()
    with session_scope() as session:
        users = _demo_users(session)
        session.expunge_all()
    return users


def _demo_users(session: Session) -> dict[str, User]:
    """The demo accounts in ``session``, those missing created: username -> user."""
    users = {u.username: u for u in repo.list_users(session)}
    for username, password, role, display in DEMO_USERS:
        if username not in users:
            users[username] = repo.create_user(session, username, password, role, display)
    return users


def _rcm_demo(
    config: DemoConfig, folder: Path, log: Callable[[str], None], progress: Callable[[Progress], None] | None = None
) -> None:
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
        progress=progress,
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
        models=("main", "baseline"),  # the demo's minute: the seed model and M10; the full Table 2 is a study away
    )


# the demo's synthetic CLE clips: (name, share of frames in diagnostic stretches); their lengths are
# DemoConfig.clip_frames. The name says the clip is synthetic wherever it is shown (Diagnose, Data, the audit log).
DEMO_CLIPS = (("synthetic-cle-clip-1.mp4", 0.3), ("synthetic-cle-clip-2.tif", 0.5))
DEMO_CLIP_OWNER = "clinician"  # the clips show under this demo account's "Your earlier clips" on Diagnose
_CLIP_FPS = 20.0
_CLIP_BATCH = 32  # frames per forward pass: on 2 CPU cores about 1.5x the rate of 8


def _missing_clips(session: Session) -> list[str]:
    """The names in :data:`DEMO_CLIPS` not yet stored for the demo clinician with a triage by the demo's MLCAM-LICI
    model (a clip and its triage are stored in one transaction, so a clip is either complete or absent)."""
    owner = session.scalar(select(User.id).where(User.username == DEMO_CLIP_OWNER))
    model = repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-main")
    if owner is None or model is None:
        return [name for name, _ in DEMO_CLIPS]
    stored = set(
        session.scalars(
            select(Clip.original_name)
            .join(ClipTriage, ClipTriage.clip_id == Clip.id)
            .where(Clip.user_id == owner, ClipTriage.model_id == model.id)
        )
    )
    return [name for name, _ in DEMO_CLIPS if name not in stored]


def ensure_demo_clips(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> None:
    """Synthetic CLE clips (:func:`core.data.synth_cle.make_cle_clip`: probe motion, red blood cells, nondiagnostic
    stretches between diagnostic ones) triaged by the demo's MLCAM-LICI model with its own map, stored as the demo
    clinician's, so Diagnose and Data show a clip's timeline and top frames on first start. Only missing clips are
    made (the model first, if it is missing too), so a rerun or an interrupted build stores no clip twice."""
    ensure_demo_localization(config, log)
    with session_scope() as session:
        owner = _demo_users(session)[DEMO_CLIP_OWNER].id
        missing = set(_missing_clips(session))
        model = repo.find_model(session, f"{DEMO_LOCALIZATION_PREFIX}-main")
    if not missing:
        return
    predictor = cached_predictor(model)
    with tempfile.TemporaryDirectory(prefix="ioai-demo-clips-") as folder:
        for i, ((name, fraction), n_frames) in enumerate(zip(DEMO_CLIPS, config.clip_frames, strict=True)):
            if name not in missing:
                continue
            clip = make_cle_clip(
                n_frames, config.cle_size, seed=3000 + config.seed + i, fps=_CLIP_FPS, diagnostic_fraction=fraction
            )
            path = write_clip(clip.frames, Path(folder) / name, fps=clip.fps)
            triage = triage_and_store(predictor, model, path, name=name, user_id=owner, batch_size=_CLIP_BATCH).triage
            log(
                f"demo clip {name}: {triage.n_frames} frames, {triage.n_positive} diagnostic by {model.name} "
                f"({int(clip.labels.sum())} diagnostic by construction)"
            )


def ensure_demo_regions(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> None:
    """The demo's regions studies on synthetic CLE frames (:mod:`services.demo_annotation`): one of SIMULATED
    annotators and one for the demo readers, whose second arm starts from the demo MLCAM-LICI model's map."""
    ensure_demo_localization(config, log)
    ensure_demo_annotation(
        f"{DEMO_LOCALIZATION_PREFIX}-main", n_frames=config.annotation_frames, size=config.cle_size, seed=config.seed,
        log=log,
    )  # fmt: skip


def ensure_demo_study(log: Callable[[str], None] = print) -> None:
    """The demo accounts and the demo reader study (test-split specimens, FL and WL arms, unaided, the demo readers),
    created if missing, so a newcomer can sign in as a reader and read at once. Also upgrades older demo workspaces."""
    init_db()
    with session_scope() as session:
        users = _demo_users(session)
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
