"""The demo's regions studies (issue 16): synthetic CLE frames with the regions drawn by SIMULATED annotators, and an
open study in which the demo readers draw them, unaided and then starting from the MLCAM-LICI model's map.

The frames come from :func:`core.data.synth_cle.make_cle_frames` (with their ground-truth masks at seed 000's two
scales, kept as the images' masks) and are imported as a small CLE cohort of their own (patients ``CLE-demo-*``, test
split), labelled diagnostic or not. The simulated annotators are programs, never people: each reader account is
inactive, its reads have ``source = "simulated"``, and the study says SIMULATED in its title and description, as the
demo's simulated label reads do. Each simulated annotator draws the truth as a person of a given habit would: it
misses a region now and then, draws generously or tightly (the outline dilated or eroded by a pixel or two), marks
a spurious region on a nondiagnostic frame now and then, and finds only some of the fine nuclei (the restrictive
layer).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from sqlalchemy import select

from core.data.store import png_bytes
from core.data.synth_cle import make_cle_frames
from db import repo
from db.models import Annotation, Read, Specimen, Study, StudyCase, User, utcnow
from db.session import session_scope
from services import studies
from services.importer import import_manifest
from services.studies.annotations import _mask_png

__all__ = [
    "ANNOTATION_LAYERS",
    "DEMO_ANNOTATION_STUDY",
    "SIMULATED_ANNOTATION_STUDY",
    "SIMULATED_ANNOTATORS",
    "Annotator",
    "annotation_done",
    "ensure_demo_annotation",
    "simulate_drawing",
]

DEMO_ANNOTATION_STUDY = "CLE frames: draw the diagnostic regions (demo)"
SIMULATED_ANNOTATION_STUDY = "CLE frames, regions drawn by SIMULATED annotators (demo)"
ANNOTATION_LAYERS = ("intermediate", "restrictive")  # seed 000's two scales of features
_PREFIX = "CLE-demo"
_OPEN_CASES = 8  # frames in the open study (per arm), half diagnostic
_START_THRESHOLD = 0.2  # seed 000's threshold for MLCAM-LICI's final map


@dataclass(frozen=True)
class Annotator:
    """How a simulated annotator draws: ``grow`` pixels added to (negative: taken from) every outline, the chance
    to ``miss`` a region, the chance of a ``spurious`` region on a frame without one, and the share of the fine
    nuclei it marks (``nuclei``)."""

    username: str
    grow: int
    miss: float
    spurious: float
    nuclei: float


SIMULATED_ANNOTATORS = (
    Annotator("sim-annotator-1", grow=0, miss=0.05, spurious=0.05, nuclei=0.8),
    Annotator("sim-annotator-2", grow=2, miss=0.10, spurious=0.15, nuclei=0.6),
    Annotator("sim-annotator-3", grow=-1, miss=0.20, spurious=0.05, nuclei=0.5),
)


def simulate_drawing(
    intermediate: np.ndarray, restrictive: np.ndarray, annotator: Annotator, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One simulated drawing of a frame with truth masks ``intermediate`` (255 region, 128 uncertain edge) and
    ``restrictive`` (255 nuclei): a bool mask per layer of :data:`ANNOTATION_LAYERS`."""
    regions, count = ndi.label(intermediate >= 128)
    drawn = np.zeros(intermediate.shape, dtype=bool)
    for number in range(1, count + 1):
        if rng.random() >= annotator.miss:
            drawn |= regions == number
    if annotator.grow > 0:
        drawn = ndi.binary_dilation(drawn, iterations=annotator.grow)
    elif annotator.grow < 0:
        drawn = ndi.binary_erosion(drawn, iterations=-annotator.grow)
    if count == 0 and rng.random() < annotator.spurious:
        height, width = intermediate.shape
        yy, xx = np.mgrid[:height, :width]
        centre, radius = rng.uniform(0.2, 0.8, 2) * (height, width), rng.uniform(0.05, 0.12) * min(height, width)
        drawn |= (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    nuclei, found = ndi.label(restrictive >= 128)
    kept = np.zeros(intermediate.shape, dtype=bool)
    for number in range(1, found + 1):
        if rng.random() < annotator.nuclei:
            kept |= nuclei == number
    return {"intermediate": drawn, "restrictive": kept & drawn}


def annotation_done() -> bool:
    """Whether both demo regions studies exist."""
    with session_scope() as session:
        titles = {s.title for s in studies.list_studies(session)}
    return DEMO_ANNOTATION_STUDY in titles and SIMULATED_ANNOTATION_STUDY in titles


def _frames(n: int, size: int, seed: int, log: Callable[[str], None]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Import ``n`` synthetic CLE frames (half diagnostic) as the demo's frame cohort, if missing; (specimen id,
    intermediate mask, restrictive mask) of each, in code order."""
    frames = make_cle_frames(n, size, seed=seed)
    codes = [f"{_PREFIX}-F{i + 1:03d}" for i in range(n)]
    with session_scope() as session:
        have = set(session.scalars(select(Specimen.code).where(Specimen.code.in_(codes))))
    if len(have) < n:
        with tempfile.TemporaryDirectory(prefix="ioai-demo-frames-") as folder:
            root = Path(folder)
            lines = ["patient_id,specimen_id,modality,path,mask_path,diagnostic,split"]
            for number, (code, frame) in enumerate(zip(codes, frames, strict=True)):
                (root / f"{code}.png").write_bytes(png_bytes(frame.image))
                (root / f"{code}-mask.png").write_bytes(png_bytes(frame.intermediate))
                lines.append(f"{_PREFIX}-P{number % 4 + 1},{code},CLE,{code}.png,{code}-mask.png,{frame.label},test")
            (root / "manifest.csv").write_text("\n".join(lines) + "\n")
            report = import_manifest(root / "manifest.csv")
        for error in report.errors:
            log(f"  skipped {error}")
        log(f"imported {report.images} synthetic CLE frames with their masks for the regions studies")
    with session_scope() as session:
        ids = dict(session.execute(select(Specimen.code, Specimen.id).where(Specimen.code.in_(codes))).all())
    return [(ids[code], frame.intermediate, frame.restrictive) for code, frame in zip(codes, frames, strict=True)]


def ensure_demo_annotation(
    model_name: str, *, n_frames: int = 24, size: int = 96, seed: int = 0, log: Callable[[str], None] = print
) -> None:
    """The demo's two regions studies, each made if missing: the closed study of SIMULATED annotators over every
    frame (two layers) and the open one for the demo readers (one layer; an unaided arm, then an arm that starts
    from ``model_name``'s map at seed 000's 0.2)."""
    frames = _frames(n_frames, size, seed, log)
    with session_scope() as session:
        titles = {s.title for s in studies.list_studies(session)}
        pi = session.scalar(select(User.id).where(User.username == "pi"))
        readers = [u.id for u in repo.list_users(session) if u.role == "reader" and u.active and u.username != "pi"]
        model = repo.find_model(session, model_name)
    if SIMULATED_ANNOTATION_STUDY not in titles:
        _simulated(pi, frames, seed, log)
    if DEMO_ANNOTATION_STUDY not in titles and model is not None:
        diagnostic = [i for i, truth, _ in frames if (truth == 255).any()][: _OPEN_CASES // 2]
        other = [i for i, truth, _ in frames if not (truth == 255).any()][: _OPEN_CASES - len(diagnostic)]
        demo_readers = {"reader", "reader2", "reader3"}
        with session_scope() as session:
            invited = [u.id for u in repo.list_users(session) if u.username in demo_readers]
            study = studies.create_study(
                session,
                title=DEMO_ANNOTATION_STUDY,
                description="Draw the regions of each CLE frame that show diagnostic features (hypercellularity: "
                "densely packed, large dark nuclei), or press No region. First on your own, then starting from the "
                "AI's map, which you correct.",
                task="diagnostic",
                specimen_ids=diagnostic + other,
                arms=[
                    studies.ArmSpec("Unaided", "CLE"),
                    studies.ArmSpec(
                        "AI start", "CLE", model_id=model.id, heatmap_method="default", start_threshold=_START_THRESHOLD
                    ),
                ],
                reader_ids=invited or readers,
                created_by=pi,
                question="regions",
            )
        from services.study_ai import prepare_study_ai

        prepare_study_ai(study.id)
        log(f"demo regions study {study.title!r}: {study.n_cases} frames x 2 arms, {len(study.reader_ids)} readers")


def _simulated(pi: int | None, frames: list[tuple[int, np.ndarray, np.ndarray]], seed: int, log) -> None:
    """The closed regions study of the SIMULATED annotators, every drawing stored as a simulated read."""
    rng = np.random.default_rng(seed + 16)
    with session_scope() as session:
        readers = []
        for annotator in SIMULATED_ANNOTATORS:
            user_id = session.scalar(select(User.id).where(User.username == annotator.username))
            if user_id is None:
                user_id = repo.add_inactive_reader(
                    session, annotator.username, f"Simulated annotator {annotator.username[-1]}", "simulated-reader"
                )
            readers.append(user_id)
        study = studies.create_study(
            session,
            title=SIMULATED_ANNOTATION_STUDY,
            description="SIMULATED drawings: three programs drew the regions from the frames' ground truth with "
            "their own habits (misses, generous or tight outlines, spurious regions). For demonstrating agreement "
            "and the heatmaps against the readers; not a real reader study.",
            task="diagnostic",
            specimen_ids=[i for i, _, _ in frames],
            arms=[studies.ArmSpec("CLE", "CLE")],
            reader_ids=readers,
            created_by=pi,
            simulated=True,
            question="regions",
            layers=ANNOTATION_LAYERS,
        )
        arm = study.arms[0]
        cases = dict(
            session.execute(
                select(StudyCase.specimen_id, StudyCase.id).where(StudyCase.study_id == study.id)
            ).all()
        )  # fmt: skip
        now = utcnow()
        for reader_id, annotator in zip(readers, SIMULATED_ANNOTATORS, strict=True):
            for specimen_id, intermediate, restrictive in frames:
                drawing = simulate_drawing(intermediate, restrictive, annotator, rng)
                layers = {layer: _mask_png(mask) for layer, mask in drawing.items()}
                empty = not any(mask.any() for mask in drawing.values())
                read = Read(
                    study_id=study.id, arm_id=arm.id, case_id=cases[specimen_id], reader_id=reader_id,
                    label=int(not empty), rating=None, answered_at=now, duration_s=float(rng.uniform(8.0, 60.0)),
                    source="simulated",
                )  # fmt: skip
                session.add(read)
                session.flush()
                session.add(
                    Annotation(
                        read_id=read.id, study_id=study.id, arm_id=arm.id, case_id=cases[specimen_id],
                        reader_id=reader_id, version=1,
                        layers={k: {"path": p, "pixels": n} for k, (p, n) in layers.items()},
                        height=intermediate.shape[0], width=intermediate.shape[1], empty=empty, created_at=now,
                    )
                )  # fmt: skip
        session.flush()
        session.get(Study, study.id).frozen_at = now
        studies.set_status(session, study.id, "closed", user_id=pi)
    log(f"demo regions study with SIMULATED annotators: {len(frames)} frames x {len(readers)} annotators")
