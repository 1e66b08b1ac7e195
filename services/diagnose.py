"""On-demand diagnosis of uploaded files: validate, predict, and store through :mod:`services.predictions`.

Each file is its own unit of work: a refused file stores nothing and does not stop the others; an accepted file's
image, upload row, heatmap and prediction row land together. ``load_predictor``, ``heatmap_path`` and
``extras_path`` live in :mod:`services.predictions` and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data.io import ImageError, read_image
from core.predict import Predictor
from db.repo import ModelInfo
from services.predictions import UploadTarget, extras_path, heatmap_path, load_predictor, store_prediction

__all__ = [
    "Outcome",
    "diagnose_files",
    "extras_path",
    "heatmap_path",
    "load_predictor",
]


@dataclass(frozen=True)
class Outcome:
    """What happened to one uploaded file; ``error`` is set when it was refused."""

    name: str
    error: str | None = None
    upload_id: int | None = None
    prediction_id: int | None = None
    probability: float | None = None
    threshold: float | None = None
    decision: bool | None = None
    heatmap: str | None = None  # workspace-relative .npy path
    image: str | None = None  # workspace-relative stored image path
    device: str | None = None
    seconds: float | None = None


def diagnose_files(
    predictor: Predictor,
    model: ModelInfo,
    files: Sequence[tuple[str, bytes | str | Path]],
    *,
    user_id: int | None,
    heatmap: str | None = "gradcam",
    progress: Callable[[int, int], None] | None = None,
    options: dict | None = None,
) -> list[Outcome]:
    """Diagnose ``(original name, bytes or path)`` pairs in order; one Outcome per file, refused ones included.

    ``options`` go to the heatmap method (e.g. Score-CAM's own ``progress`` callback)."""
    if predictor.modality != model.modality:
        raise ValueError(f"predictor modality {predictor.modality} does not match model {model.name}")
    outcomes: list[Outcome] = []
    for done, (name, source) in enumerate(files, start=1):
        try:
            image = read_image(source, name)
            (result,) = predictor.diagnose([image], heatmap=heatmap, options=options)
            if isinstance(result, ImageError):
                raise result
            stored = store_prediction(
                model,
                UploadTarget(image, user_id),
                probability=result.probability,
                threshold=result.threshold,
                method=result.method,
                heatmap=result.heatmap,
                extras=result.extras,
                device=result.device,
                seconds=result.seconds,
            )
            outcomes.append(
                Outcome(
                    name=image.name,
                    upload_id=stored.upload_id,
                    prediction_id=stored.prediction_id,
                    probability=result.probability,
                    threshold=result.threshold,
                    decision=result.decision,
                    heatmap=stored.map_path,
                    image=stored.image_path,
                    device=result.device,
                    seconds=result.seconds,
                )
            )
        except ImageError as error:
            outcomes.append(Outcome(name=name, error=error.reason))
        if progress:
            progress(done, len(files))
    return outcomes
