"""Import a cohort (a folder of images plus a CSV manifest) into the workspace and the database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from core.data.io import ImageError, read_image
from core.data.manifest import ManifestRow, patient_split, read_manifest
from core.data.store import store_image
from core.settings import workspace_dir
from db import repo
from db.session import init_db, session_scope
from services.jobs.context import claim

__all__ = ["ImportReport", "import_manifest"]


@dataclass
class ImportReport:
    specimens: int = 0
    images: int = 0
    errors: list[str] = field(default_factory=list)


def import_manifest(
    manifest: str | Path,
    *,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Store every valid row's image (metadata stripped, content-addressed) and its specimen, patient and labels.

    Rows without a split get a patient-level split by ``fractions``. Bad rows (unreadable image, bad label) are
    reported by line and skipped; the good ones are committed together, so a crash leaves no partial import.
    """
    rows, errors = read_manifest(manifest)
    report = ImportReport(errors=list(errors))
    unsplit = {r.patient_id for r in rows if r.split is None}
    assigned = patient_split(unsplit, fractions, seed) if unsplit else {}
    root = workspace_dir()
    init_db()
    specimens: set[str] = set()
    with session_scope() as session:
        for done, row in enumerate(rows, start=1):
            try:
                _import_row(session, row, assigned, root)
            except (ImageError, ValueError) as error:
                report.errors.append(f"line {row.line}: {error}")
                continue
            finally:
                if progress:
                    progress(done, len(rows))
            specimens.add(row.specimen_id)
            report.images += 1
        claim(session, imported_images=report.images, imported_specimens=len(specimens))
    report.specimens = len(specimens)
    return report


def _import_row(session: Session, row: ManifestRow, assigned: dict[str, str], root: Path) -> None:
    """One row in its own savepoint: its specimen, label and image land together or not at all."""
    image = read_image(row.path, row.path.name)
    mask = read_image(row.mask_path, row.mask_path.name) if row.mask_path else None
    with session.begin_nested():
        stored = store_image(image, root)
        stored_mask = store_image(mask, root, folder="masks").path if mask is not None else None
        specimen_id = repo.add_specimen(
            session,
            row.patient_id,
            row.specimen_id,
            split=row.split or assigned.get(row.patient_id),
            tumor=row.tumor,
            grade=row.grade,
            ki67=row.ki67,
        )
        repo.add_specimen_image(
            session, specimen_id, row.modality, stored.path, stored.sha256, stored.height, stored.width, stored_mask
        )
