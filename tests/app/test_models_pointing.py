"""The Models page tells a PI whether an FL model's heatmap finds the tumor better than the brightest spot."""

from __future__ import annotations

import uuid
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.session import init_db, session_scope

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _models_page() -> AppTest:
    init_db()
    with session_scope() as s:
        pi = repo.create_user(s, f"pi-{uuid.uuid4().hex[:6]}", "pw-long-enough-1", "pi").id
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.session_state["auth_user_id"] = pi
    at.run()
    return at.switch_page("../pages/models.py").run()


def test_the_models_page_shows_the_pointing_game_with_its_baseline(use_trained: Path) -> None:
    models = {m.name: m for m in repo.list_models()}
    report = models["tiny-FL"].metrics["pointing"]
    at = _models_page()
    at.selectbox(key="models_pick").set_value(models["tiny-FL"].id).run()
    assert not at.exception, at.exception
    shown = [m.value for m in at.markdown]
    heat, bright = report["heatmap"], report["brightest"]
    line = next(v for v in shown if v.startswith("Pointing game"))
    assert line == md_escape(
        f"Pointing game: the peak of the Grad-CAM map falls in the tumor for {100 * heat['rate']:.0f} % of "
        f"{heat['n']} test tumor specimens (95 % CI {100 * heat['ci'][0]:.0f} %-{100 * heat['ci'][1]:.0f} %); the "
        f"brightest spot of the tissue (no model), for {100 * bright['rate']:.0f} % "
        f"(95 % CI {100 * bright['ci'][0]:.0f} %-{100 * bright['ci'][1]:.0f} %)."
    )
    assert any(v.startswith(md_escape("Tumor vs non-tumor on the same")) for v in shown)
    assert any("Does the heatmap find the tumor?" in h.value for h in at.subheader)

    at.selectbox(key="models_pick").set_value(models["tiny-WL"].id).run()
    assert not at.exception
    assert not any(m.value.startswith("Pointing game") for m in at.markdown)
