"""The Diagnose page's live view of an opened clip triage, with Streamlit's AppTest: the owner plays a tiny stored clip
at its frame rate, frame by frame with the model's map over it, the running decision and whether the machine keeps
up; the overlay can be switched off; another user cannot reach it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from core.data.localization_set import generate_set
from core.data.synth_cle import make_cle_clip, write_clip
from core.train import TrainConfig
from db.models import AuditEvent
from db.session import read_scope
from services.clips import triage_and_store
from services.localization import train_on_set
from services.predictions import load_predictor
from tests.app.test_jobs_pages import _page, _user

N_FRAMES = 8
PACE = re.compile(r"(Keeping up: [\d.]+ of 20 frames/s, latency \d+ ms|Falling behind: showing [\d.]+ of 20 frames/s)")


@pytest.fixture(scope="module")
def cle_set(tmp_path_factory: pytest.TempPathFactory):
    return generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=64, seed=3)


@pytest.fixture
def stored(workspace: Path, cle_set, tmp_path: Path) -> tuple[int, int]:
    """A clinician and their triage of a tiny clip (8 frames of 64 px at 20 frames/s) by a tiny MLCAM-LICI model."""
    config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
    info, _ = train_on_set(config, cle_set, name="cle-live", log=lambda _: None)
    clip = make_cle_clip(N_FRAMES, 64, seed=2, fps=20.0)
    path = write_clip(clip.frames, tmp_path / "site.tif", fps=clip.fps)
    owner = _user("clinician")
    triage = triage_and_store(load_predictor(info, device="cpu"), info, path, user_id=owner, top_k=1)
    return owner, triage.triage_id


def _opened(user_id: int, triage_id: int):
    at = _page(user_id, "../pages/diagnose.py")
    at.session_state["diagnose_clip_open"] = triage_id
    return at.run()


def _frames(at) -> list[str]:
    return [h.value for h in at.get("html") if "data:image/png;base64," in h.value and "Live: frame " in h.value]


def test_the_owner_plays_the_clip_live_with_the_map_the_running_decision_and_the_pace(stored) -> None:
    owner, triage_id = stored
    at = _opened(owner, triage_id)
    assert not at.exception
    assert any(m.value == "**Live view**" for m in at.markdown)
    assert not _frames(at), "nothing plays before Play is pressed"
    play = f"diagnose_history_clip_{triage_id}_live_play"
    at.button(key=play).click().run()
    assert not at.exception
    (frame,) = _frames(at)  # one placeholder, holding the last frame shown
    assert re.search(rf"Live: frame {N_FRAMES - 1} · 0\.35 s · probability [\d.]+ · MLCAM-LICI", frame)
    assert any(
        re.fullmatch(r"Last 0\.5 s: probability \*\*[\d.]+\*\* · \*\*(non-)?diagnostic\*\*", m.value)
        for m in at.markdown
    )
    (pace,) = [m.value for m in at.markdown if PACE.search(m.value)]
    assert pace.startswith((":green[Keeping up", ":orange[Falling behind"))
    with read_scope() as s:
        played = s.scalars(select(AuditEvent).where(AuditEvent.action == "clip_played")).all()
    assert [(e.user_id, e.detail["triage"]) for e in played] == [(owner, triage_id)]

    # the overlay switched off: frames without a map; a rerun that is no Play (e.g. Stop) plays nothing
    at.toggle(key=f"diagnose_history_clip_{triage_id}_live_map").set_value(False).run()
    assert not at.exception and not _frames(at)
    assert any(PACE.search(c.value) and c.value.startswith("Last replay: ") for c in at.caption)
    at.button(key=play).click().run()
    assert not at.exception
    (frame,) = _frames(at)
    assert f"Live: frame {N_FRAMES - 1} · " in frame and "MLCAM-LICI" not in frame
    at.button(key=f"diagnose_history_clip_{triage_id}_live_stop").click().run()
    assert not at.exception and not _frames(at)


def test_another_user_cannot_open_or_play_the_clip(stored) -> None:
    _, triage_id = stored
    other = _user("clinician")
    at = _opened(other, triage_id)
    assert not at.exception
    assert not any(m.value == "**Live view**" for m in at.markdown)
    assert not [b for b in at.button if b.key == f"diagnose_history_clip_{triage_id}_live_play"]
