"""Clip triage end to end on real clip files and a tiny trained CLE model: every frame scored in batches exactly as
one at a time, the top frames apart and with the model's own map, the store (rows and files, or nothing at all), the
``clip`` command's contract, and the ``clip`` job kind's checks."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.data.clips import ClipError, open_clip
from core.data.io import Image
from core.data.localization_set import generate_set
from core.data.store import png_bytes
from core.data.synth_cle import make_cle_clip, write_clip
from core.train import TrainConfig
from core.triage import default_method, frames_csv, pick_top, triage_clip
from db.models import AuditEvent, Clip, ClipTriage, Job
from db.session import read_scope, session_scope
from services.cli import main as cli
from services.clips import recent_triages, triage_and_store, triage_csv, triage_probabilities, triage_view
from services.jobs.context import JobStopped, RunningJob, running_job
from services.jobs.kinds import check_params
from services.localization import train_on_set
from services.predictions import load_predictor

N_FRAMES = 40
SIZE = 64


@pytest.fixture(scope="module")
def cle_set(tmp_path_factory: pytest.TempPathFactory):
    return generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=SIZE, seed=3)


@pytest.fixture
def cle_model(workspace: Path, cle_set):
    """A tiny MLCAM-LICI diagnostic-frame model registered in this test's workspace, and its predictor."""
    config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
    info, _ = train_on_set(config, cle_set, name="cle-triage", log=lambda _: None)
    return info, load_predictor(info, device="cpu")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clip = make_cle_clip(N_FRAMES, SIZE, seed=5, fps=20.0)
    return write_clip(clip.frames, tmp_path_factory.mktemp("clips") / "biopsy site 1.tif", fps=clip.fps)


def _counts() -> tuple[int, int]:
    with read_scope() as s:
        return s.scalar(select(func.count()).select_from(Clip)), s.scalar(select(func.count()).select_from(ClipTriage))


def test_pick_top_takes_the_highest_frames_apart_from_each_other() -> None:
    p = np.array([0.1, 0.9, 0.95, 0.2, 0.8, 0.7, 0.05, 0.85], dtype=np.float32)
    assert pick_top(p, 3, min_gap=2) == [2, 7, 4]  # 1 is next to 2; 4 is 3 frames from 7
    assert pick_top(p, 3, min_gap=1) == [2, 1, 7]
    assert pick_top(p, 10, min_gap=3) == [2, 7]  # every other frame is within 2 of these
    assert pick_top(p, 2, min_gap=1, candidates=np.array([0, 3, 6])) == [3, 0]
    assert pick_top(p, 0, min_gap=1) == []


def test_frames_csv_has_one_row_per_frame_in_order() -> None:
    rows = list(csv.DictReader(io.StringIO(frames_csv(np.array([0.2, 0.5, 0.9], dtype=np.float32), 0.5))))
    assert [(r["frame"], r["decision"]) for r in rows] == [("0", "0"), ("1", "1"), ("2", "1")]
    assert float(rows[2]["probability"]) == pytest.approx(0.9)


def test_triage_scores_every_frame_in_batches_as_one_at_a_time(cle_model, clip_file) -> None:
    model, predictor = cle_model
    assert default_method(predictor.methods) == "mlcam-lici"  # the model's own map
    seen = []
    with open_clip(clip_file) as clip:
        triage = triage_clip(
            predictor, clip, batch_size=8, top_k=3, min_gap=5, progress=lambda d, t: seen.append((d, t))
        )
    assert triage.n_frames == N_FRAMES and triage.probabilities.dtype == np.float32
    assert seen[-1] == (N_FRAMES, N_FRAMES) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    with open_clip(clip_file) as clip:
        frames = list(clip.frames())
    single = [predictor.diagnose([Image(f, name="f", format="NPY")], heatmap=None)[0].probability for f in frames]
    np.testing.assert_allclose(triage.probabilities, single, atol=1e-5)

    assert triage.method == "mlcam-lici" and len(triage.top) == 3
    indices = [t.index for t in triage.top]
    assert [t.probability for t in triage.top] == sorted((t.probability for t in triage.top), reverse=True)
    assert all(abs(a - b) >= 5 for a in indices for b in indices if a != b)
    assert triage.top[0].probability == pytest.approx(float(triage.probabilities.max()))
    for top in triage.top:
        np.testing.assert_array_equal(top.frame, frames[top.index])
        assert top.heatmap.shape == frames[top.index].shape and 0.0 <= top.heatmap.min() <= top.heatmap.max() <= 1.0
    assert (triage.n_positive, triage.fps) == (int((triage.probabilities >= model.threshold).sum()), 20.0)


def test_no_top_frames_and_no_maps_when_asked_for_none(cle_model, clip_file) -> None:
    _, predictor = cle_model
    with open_clip(clip_file) as clip:
        triage = triage_clip(predictor, clip, top_k=0)
    assert triage.top == () and triage.method is None and triage.n_frames == N_FRAMES
    with open_clip(clip_file) as clip:
        unmapped = triage_clip(predictor, clip, top_k=2, heatmap=None)
    assert len(unmapped.top) == 2 and all(t.heatmap is None for t in unmapped.top)
    assert abs(unmapped.top[0].index - unmapped.top[1].index) >= 10  # by default half a second apart at 20 frames/s
    with open_clip(clip_file) as clip, pytest.raises(ValueError, match="does not apply"):
        triage_clip(predictor, clip, heatmap="compsegnet")


def test_a_triage_is_stored_with_its_files_rows_and_audit_entry(cle_model, clip_file, workspace) -> None:
    model, predictor = cle_model
    stored = triage_and_store(predictor, model, clip_file, user_id=None, top_k=2)
    view = triage_view(stored.triage_id)
    assert (view["name"], view["kind"], view["n_frames"], view["fps"]) == (clip_file.name, "tiff", N_FRAMES, 20.0)
    assert (view["height"], view["width"], view["model"]) == (SIZE, SIZE, "cle-triage")
    np.testing.assert_array_equal(triage_probabilities(view), stored.triage.probabilities)
    assert triage_csv(view) == frames_csv(stored.triage.probabilities, model.threshold)
    assert [t["frame"] for t in view["top"]] == [t.index for t in stored.triage.top]
    for top in view["top"]:
        assert (workspace / top["image_path"]).is_file() and (workspace / top["heatmap_path"]).is_file()
    with read_scope() as s:
        clip = s.get(Clip, view["clip_id"])
        assert (workspace / clip.path).read_bytes() == clip_file.read_bytes()
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "clip_triaged")).all()
    assert len(events) == 1 and events[0].detail["frames"] == N_FRAMES
    assert [r["id"] for r in recent_triages()] == [stored.triage_id]
    # the same clip again: its file is kept once, under the same content-derived name
    again = triage_and_store(predictor, model, clip_file, user_id=None, top_k=2)
    assert triage_view(again.triage_id)["probabilities_path"] == view["probabilities_path"]
    assert _counts() == (2, 2)


def test_a_refused_clip_stores_nothing(cle_model, workspace, tmp_path) -> None:
    model, predictor = cle_model
    still = tmp_path / "still.png"
    still.write_bytes(png_bytes(np.zeros((SIZE, SIZE), dtype=np.uint8)))
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    for path in (still, broken):
        with pytest.raises(ClipError):
            triage_and_store(predictor, model, path, user_id=None)
    assert _counts() == (0, 0)
    assert not (workspace / "clips").exists() or not any(p.is_file() for p in (workspace / "clips").rglob("*"))


def test_a_cancelled_job_stores_no_row(cle_model, clip_file) -> None:
    model, predictor = cle_model
    with session_scope() as s:
        job = Job(kind="clip", title="a clip", state="cancelled")
        s.add(job)
        s.flush()
        running = RunningJob(id=job.id, kind="clip", submitted_by=None)
    with running_job(running), pytest.raises(JobStopped, match="cancelled"):
        triage_and_store(predictor, model, clip_file, user_id=None, top_k=1)
    assert _counts() == (0, 0)


def test_the_clip_command_writes_frames_csv_and_the_top_frames(cle_model, clip_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert cli(["clip", str(clip_file), "--model", "cle-triage", "--out", str(out), "--top", "2"]) == 0
    rows = list(csv.DictReader((out / "frames.csv").open()))
    assert len(rows) == N_FRAMES and list(rows[0]) == ["frame", "probability", "decision"]
    assert [int(r["frame"]) for r in rows] == list(range(N_FRAMES))
    pictures = sorted(p.name for p in out.glob("frame-*.png"))
    assert len([p for p in pictures if p.endswith("_overlay.png")]) == 2
    assert len([p for p in pictures if "_" not in p]) == 2  # the frames themselves
    assert "top frames" in capsys.readouterr().out


def test_the_clip_command_refuses_a_bad_clip_with_one_error_line(cle_model, tmp_path, capsys) -> None:
    still = tmp_path / "still.png"
    still.write_bytes(png_bytes(np.zeros((SIZE, SIZE), dtype=np.uint8)))
    out = tmp_path / "out"
    assert cli(["clip", str(still), "--model", "cle-triage", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {still}: ")
    assert not (out / "frames.csv").exists()


def test_the_clip_job_kind_checks_its_model_and_file(cle_model, clip_file, workspace, tmp_path) -> None:
    kept = workspace / "incoming" / "c.tif"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(clip_file.read_bytes())
    title, params = check_params("clip", {"model": "cle-triage", "file": "incoming/c.tif", "name": "site 1.tif"})
    assert params == {
        "model": "cle-triage",
        "file": "incoming/c.tif",
        "name": "site 1.tif",
        "top": 5,
        "batch_size": 8,
        "heatmap": "default",
    }
    assert "site 1.tif" in title
    with pytest.raises(ValueError, match="not in the workspace"):
        check_params("clip", {"model": "cle-triage", "file": "incoming/missing.tif"})
    with pytest.raises(ValueError, match="inside the workspace"):
        check_params("clip", {"model": "cle-triage", "file": "../etc/passwd"})
    with pytest.raises(ValueError, match="unknown heatmap"):
        check_params("clip", {"model": "cle-triage", "file": "incoming/c.tif", "heatmap": "x"})
    with pytest.raises(ValueError, match="no registered model"):
        check_params("clip", {"model": "nope", "file": "incoming/c.tif"})


def _clinician(name: str) -> int:
    from db import repo

    with session_scope() as s:
        return repo.create_user(s, name, "pw-long-enough-1", "clinician").id


def test_live_source_is_the_owners_clip_and_model_and_is_audited(cle_model, clip_file) -> None:
    from core.live import Replay
    from services.clips import live_source

    model, predictor = cle_model
    owner, other = _clinician("owner"), _clinician("other")
    stored = triage_and_store(predictor, model, clip_file, user_id=owner, top_k=1)
    source = live_source(owner, stored.triage_id)
    assert (source.triage_id, source.name, source.fps, source.model.name) == (
        stored.triage_id, clip_file.name, 20.0, "cle-triage"
    )  # fmt: skip
    assert source.path.read_bytes() == clip_file.read_bytes()
    clock = iter(np.arange(0.0, 100.0, 0.001))  # a clock that moves 1 ms a look: every frame in time
    with open_clip(source.path, source.name) as clip:
        records = list(Replay(predictor, clip, heatmap=None, clock=lambda: float(next(clock)), sleep=lambda _: None))
    assert [r.index for r in records] == list(range(N_FRAMES))
    np.testing.assert_allclose([r.probability for r in records], stored.triage.probabilities, atol=1e-5)

    # another clinician, a forged id, and a triage nobody owns get nothing
    unowned = triage_and_store(predictor, model, clip_file, user_id=None, top_k=1)
    assert live_source(other, stored.triage_id) is None
    assert live_source(owner, stored.triage_id + 1000) is None
    assert live_source(owner, unowned.triage_id) is None
    with read_scope() as s:
        played = s.scalars(select(AuditEvent).where(AuditEvent.action == "clip_played")).all()
    assert [(e.user_id, e.detail["triage"], e.detail["model"]) for e in played] == [
        (owner, stored.triage_id, "cle-triage")
    ]
