"""Home: the signed-in role's dashboard.

- PI: the open reader studies with each reader's progress per arm, the jobs running and queued (and the last few
  finished), everyone's recent diagnoses, and the registered models with their held-out figures.
- Clinician: their own recent diagnoses.
- Reader: their own open studies, how far they are in each arm and which arm is open; nothing about truth, AI
  output or other readers.
- Everyone: while the demo workspace is being built (the first start), a banner with each part's progress.

Running jobs are followed by a fragment that reruns every few seconds, and the whole page once one of them ends.
User text (titles, names, messages) is shown through ``md_escape`` or in data frames, never as markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from app.auth import require_role
from core.text import md_escape
from services import dashboard
from services.jobs.store import ACTIVE, FINAL, JobInfo, list_jobs

_FOLLOW_SECONDS = 3
_JOBS_PAGE = "../pages/jobs.py"

user = require_role("pi", "clinician", "reader")


def _when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M}"


def _job_bar(job: JobInfo) -> None:
    parts = [job.title, job.state, job.message, f"by {job.submitted_by_name}" if job.submitted_by_name else ""]
    st.progress(min(1.0, max(0.0, job.progress)), text=md_escape(" · ".join(p for p in parts if p)))


def _follow(kinds: tuple[str, ...] | None, render: Callable[[list[JobInfo]], None]) -> None:
    """Show the active jobs (of ``kinds``) with ``render``; while any is active, look again every few seconds, and
    rerun the whole page once the set of active jobs changed (one ended: what it built shows up)."""
    jobs = list_jobs(states=ACTIVE, kinds=kinds)
    unread = [jobs]  # this run's first showing uses the jobs just read; the fragment's own reruns read again

    def follow(shown: tuple[int, ...]) -> None:
        now = unread.pop() if unread else list_jobs(states=ACTIVE, kinds=kinds)
        if tuple(j.id for j in now) != shown:
            st.rerun()
        render(now)

    every = _FOLLOW_SECONDS if jobs else None
    st.fragment(follow, run_every=every)(tuple(j.id for j in jobs))


def _demo_banner(jobs: list[JobInfo]) -> None:
    if not jobs:
        return
    with st.container(border=True):
        st.info("The demo workspace is being built. The app works meanwhile; its data appear here as each part ends.")
        for job in jobs:
            _job_bar(job)


def _running_jobs(jobs: list[JobInfo]) -> None:
    if not jobs:
        st.caption("No job is running or queued.")
    for job in jobs:
        _job_bar(job)


def _page_link(script: str, label: str, icon: str) -> None:
    """A link to another page, only once that page's script exists."""
    if (Path(__file__).resolve().parent / Path(script).name).is_file():
        st.page_link(script, label=label, icon=icon)


def _studies_section() -> None:
    st.subheader("Reader studies")
    progress = dashboard.study_progress()
    if not progress:
        st.info("No open reader study. Set one up on the Studies page.")
        st.page_link("../pages/studies.py", label="Studies", icon=":material/groups:")
        return
    for study in progress:
        st.markdown(f"**{md_escape(study.title)}** · {study.n_cases} cases · {len(study.arms)} arm(s)")
        if not study.readers:
            st.caption("No reader invited yet: invite readers on the Studies page.")
            continue
        st.progress(study.done, text=f"{study.done:.0%} of all reads done")
        columns = [f"Arm {i + 1}: {name}" for i, name in enumerate(study.arms)]
        frame = pd.DataFrame(
            [
                {"reader": r.name, "username": r.username}
                | {c: f"{a} / {study.n_cases}" for c, a in zip(columns, r.answered, strict=True)}
                for r in study.readers
            ]
        )
        st.dataframe(frame, hide_index=True, key=f"home_study_{study.id}")


def _jobs_section() -> None:
    st.subheader("Jobs")
    _follow(None, _running_jobs)
    finished = list_jobs(states=FINAL, limit=5)
    if finished:
        st.caption("Last finished")
        frame = pd.DataFrame(
            [
                {"job": j.title, "state": j.state, "ended (UTC)": _when(j.finished_at), "by": j.submitted_by_name or ""}
                for j in finished
            ]
        )
        st.dataframe(frame, hide_index=True, key="home_jobs_finished")
    _page_link(_JOBS_PAGE, "All jobs", ":material/work_history:")


def _diagnoses_section(user_id: int | None) -> None:
    st.subheader("Recent diagnoses" if user_id is None else "Your recent diagnoses")
    diagnoses = dashboard.recent_diagnoses(user_id=user_id)
    if not diagnoses:
        st.info("No diagnoses yet: upload an image on the Diagnose page.")
    else:
        frame = pd.DataFrame(
            [
                {
                    "image": d.image,
                    "model": d.model,
                    "probability": round(d.probability, 3),
                    "decision": d.decision,
                    "when (UTC)": _when(d.at),
                }
                | ({"by": d.user or ""} if user_id is None else {})
                for d in diagnoses
            ]
        )
        st.dataframe(frame, hide_index=True, key="home_diagnoses")
    st.page_link("../pages/diagnose.py", label="Diagnose an image", icon=":material/neurology:")


def _models_section() -> None:
    st.subheader("Models")
    models = dashboard.model_figures()
    if not models:
        st.info("No models yet: train one on the Models page.")
    else:
        frame = pd.DataFrame(
            [
                {
                    "name": m.name,
                    "task": m.task,
                    "modality": m.modality,
                    "architecture": m.architecture,
                    "scored on": f"{m.split} ({m.n})" if m.n is not None else m.split,
                    "AUC": m.auc,
                    "sensitivity": m.sensitivity,
                    "specificity": m.specificity,
                    "threshold": round(m.threshold, 3),
                }
                for m in models
            ]
        ).round(3)
        st.dataframe(frame, hide_index=True, key="home_models")
        st.caption("Figures on the test split where the model was scored on one, else on the validation split.")
    st.page_link("../pages/models.py", label="Models", icon=":material/model_training:")


def _reader_section(user_id: int) -> None:
    st.subheader("Your reader studies")
    mine = dashboard.reader_progress(user_id)
    if not mine:
        st.info("No open reader study is assigned to you. Your study coordinator will invite you when one opens.")
        return
    states = {"done": "done", "open": "open", "training": "open after the training cases", "later": "not yet"}
    for study in mine:
        st.markdown(f"**{md_escape(study.title)}**")
        frame = pd.DataFrame(
            [
                {
                    "arm": f"Arm {i + 1}: {arm.name}",
                    "answered": f"{arm.answered} / {arm.total}",
                    "status": f"opens {_when(arm.opens_at)} UTC" if arm.state == "washout" else states[arm.state],
                }
                for i, arm in enumerate(study.arms)
            ]
        )
        st.dataframe(frame, hide_index=True, key=f"home_reader_{study.id}")
    st.page_link("../pages/read.py", label="Continue reading", icon=":material/visibility:")


st.title("Intraoperative imaging AI")
st.markdown(f"Signed in as **{md_escape(user.display_name)}** ({user.role}).")
_follow(("demo",), _demo_banner)

if user.role == "pi":
    _studies_section()
    _jobs_section()
    _diagnoses_section(None)
    _models_section()
elif user.role == "clinician":
    _diagnoses_section(user.id)
else:
    _reader_section(user.id)

st.caption("Research software. Not a medical device: decisions stay with the surgical team and pathology.")
