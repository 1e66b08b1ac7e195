"""The demo's ``clips`` part: synthetic CLE clips triaged by the demo's MLCAM-LICI model and stored as the demo
clinician's, every frame scored, the top frames with the model's own map; built once, resumed where it stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.data.clips import open_clip
from core.data.io import Image
from core.data.localization_set import generate_set
from core.settings import pointing_at
from core.train import TrainConfig
from db import repo
from db.models import AuditEvent, Clip, ClipTriage
from db.repo import ModelInfo
from db.session import read_scope
from services import demo
from services.clips import recent_triages, triage_probabilities, triage_view
from services.demo import (
    DEMO_CLIP_OWNER,
    DEMO_CLIPS,
    DEMO_LOCALIZATION_PREFIX,
    DemoConfig,
    build_demo_part,
    ensure_demo_accounts,
    ensure_demo_clips,
)
from services.localization import train_on_set
from services.predictions import load_predictor
from tests.conftest import copy_workspace

SIZE = 64
CONFIG = DemoConfig(cle_counts=(12, 6, 6), cle_size=SIZE, cle_epochs=1, clip_frames=(40, 30))


@pytest.fixture(scope="module")
def localized_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelInfo]:
    """The demo accounts and a tiny MLCAM-LICI model registered under the demo's localisation name (what the
    ``localization`` part leaves), so the ``clips`` part trains nothing. Built once; each test gets a copy."""
    root = tmp_path_factory.mktemp("demo_ws")
    with pointing_at(root):
        ensure_demo_accounts()
        data = generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=SIZE, seed=3)
        config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
        info, _ = train_on_set(config, data, name=f"{DEMO_LOCALIZATION_PREFIX}-main", log=lambda _: None)
    return root, info


@pytest.fixture
def demo_model(localized_workspace, workspace: Path) -> ModelInfo:
    source, info = localized_workspace
    shutil.rmtree(workspace)
    copy_workspace(source, workspace)
    return info


def _counts() -> tuple[int, int, int]:
    with read_scope() as s:
        return (
            s.scalar(select(func.count()).select_from(Clip)),
            s.scalar(select(func.count()).select_from(ClipTriage)),
            s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "clip_triaged")),
        )


def _clinician_id() -> int:
    return next(u.id for u in repo.list_users() if u.username == DEMO_CLIP_OWNER)


def test_the_clips_part_stores_synthetic_clips_triaged_by_mlcam_lici_for_the_demo_clinician(
    demo_model, workspace
) -> None:
    assert build_demo_part("clips", CONFIG, log=lambda _: None, progress=None) == {"built": ["clips"], "skipped": []}
    triages = recent_triages(user_id=_clinician_id())
    assert sorted(t["clip"] for t in triages) == sorted(name for name, _ in DEMO_CLIPS)
    assert all("synthetic" in t["clip"] for t in triages)
    assert {t["model"] for t in triages} == {f"{DEMO_LOCALIZATION_PREFIX}-main"}
    assert len(recent_triages()) == len(DEMO_CLIPS)  # nobody else's, no extra
    predictor = load_predictor(demo_model, device="cpu")
    kinds = {".mp4": "video", ".tif": "tiff"}
    for (name, _), n_frames in zip(DEMO_CLIPS, CONFIG.clip_frames, strict=True):
        view = triage_view(next(t["id"] for t in triages if t["clip"] == name))
        assert (view["kind"], view["n_frames"], view["fps"]) == (kinds[Path(name).suffix], n_frames, 20.0)
        assert (view["height"], view["width"], view["user_id"]) == (SIZE, SIZE, _clinician_id())
        assert view["heatmap_method"] == "mlcam-lici"  # the model's own map
        probabilities = triage_probabilities(view)
        assert probabilities.shape == (n_frames,) and np.all((probabilities >= 0) & (probabilities <= 1))
        assert view["n_positive"] == int((probabilities >= demo_model.threshold).sum())
        assert view["top"] and view["top"][0]["probability"] == pytest.approx(float(probabilities.max()))
        for top in view["top"]:
            assert (workspace / top["image_path"]).is_file() and (workspace / top["heatmap_path"]).is_file()
        with read_scope() as s:
            clip_path = workspace / s.get(Clip, view["clip_id"]).path
        with open_clip(clip_path, name) as clip:
            frames = list(clip.frames())
        assert len(frames) == n_frames
        best = view["top"][0]["frame"]
        single = predictor.diagnose([Image(frames[best], name=name, format="NPY")], heatmap=None)[0].probability
        assert single == pytest.approx(float(probabilities[best]), abs=1e-5)  # scored by the demo's model


def test_the_clips_part_is_built_once(demo_model) -> None:
    build_demo_part("clips", CONFIG, log=lambda _: None, progress=None)
    stored = _counts()
    assert stored == (len(DEMO_CLIPS),) * 3
    assert build_demo_part("clips", CONFIG, log=lambda _: None, progress=None) == {"built": [], "skipped": ["clips"]}
    ensure_demo_clips(CONFIG, log=lambda _: None)  # called directly, as an upgrade would
    assert _counts() == stored


def test_an_interrupted_clips_part_resumes_with_the_missing_clip_only(demo_model, monkeypatch) -> None:
    calls = []
    store = demo.triage_and_store

    def stops_at_the_second(*args, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return store(*args, **kwargs)

    monkeypatch.setattr(demo, "triage_and_store", stops_at_the_second)
    with pytest.raises(RuntimeError, match="stopped"):
        build_demo_part("clips", CONFIG, log=lambda _: None, progress=None)
    assert _counts() == (1, 1, 1)
    assert build_demo_part("clips", CONFIG, log=lambda _: None, progress=None)["built"] == ["clips"]
    assert calls == [DEMO_CLIPS[0][0], DEMO_CLIPS[1][0], DEMO_CLIPS[1][0]]  # the stored clip is not made again
    assert sorted(t["clip"] for t in recent_triages(user_id=_clinician_id())) == sorted(n for n, _ in DEMO_CLIPS)
