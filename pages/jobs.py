"""Jobs (PI): every job, newest first, filtered by state and kind; each with its progress, who started it, when, where
it ran, its error and log, and what it produced. Cancel a queued or running job; retry one that did not succeed.

While any job is queued or running, the list is a fragment that reads the jobs again every few seconds (the list
only, not the page); once none is, it stops. The buttons act in callbacks, before the list is drawn again, so the
list shows their effect at once and a second click meets the job's new state: cancelling a cancelled job changes
nothing (``service.cancel`` is idempotent), and a second retry is refused by ``service.retry``, shown as a message.
Job text (titles hold names people typed; messages, errors, logs) is shown as text: through ``md_escape`` where
Streamlit reads markdown, and the log with ``st.code``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from app.auth import USER_KEY, current_user, require_role
from app.widgets import heatmap_viewer, job_header, triage_viewer
from core.text import md_escape
from db import repo
from services.clips import triage_view
from services.jobs import service, store
from services.jobs.kinds import KINDS
from services.jobs.store import ACTIVE, FINAL, JobInfo

REFRESH_SECONDS = 2
STATES = (*ACTIVE, *FINAL)
RETRIABLE = ("failed", "cancelled", "interrupted")
_NOTICE = "jobs_notice"  # (level, text) of the last button's outcome
_OPEN = "jobs_open"  # the prediction opened from a job
_OPEN_CLIP = "jobs_open_clip"  # the clip triage opened from a job
_INTERNAL = {"model_id", "upload_id", "uploads"}  # result entries that name rows, shown through other entries

user = require_role("pi")
st.title("Jobs")


def _when(moment: datetime | None) -> str:
    return "–" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _act(action: str, job_id: int) -> None:
    """A Cancel or Retry button's callback (run before the rerun it starts): the outcome, kept as a notice."""
    acting = current_user()
    if acting is None or acting.role != "pi":
        return  # the session ended: the next run shows the sign-in page
    try:
        if action == "cancel":
            state = service.cancel(job_id, user_id=acting.id)
            notice = ("info", f"Job {job_id} is cancelled." if state == "cancelled" else f"Job {job_id} is {state}.")
        else:
            notice = ("success", f"Job {job_id} is retried as job {service.retry(job_id, user_id=acting.id)}.")
    except service.JobNotLaunched as error:
        notice = ("warning", str(error))
    except ValueError as error:
        notice = ("error", str(error))
    st.session_state[_NOTICE] = notice


def _listed(values: Any) -> list[Any]:
    return list(values) if isinstance(values, list | tuple) else [values]


def _products(job: JobInfo) -> None:
    """What the job stored, each with where to see it."""
    result = job.result
    models = list(dict.fromkeys(_listed(result.get("models", [])) + _listed(result.get("model") or [])))
    if models:
        names = ", ".join(f"**{md_escape(name)}**" for name in models)
        st.markdown(f"Registered {'model' if len(models) == 1 else 'models'} {names}: see the Models page.")
    evaluations = list(dict.fromkeys(_listed(result.get("evaluations", [])) + _listed(result.get("evaluation_id", []))))
    if evaluations:
        st.markdown(
            f"Stored {'evaluation' if len(evaluations) == 1 else 'evaluations'} "
            + ", ".join(f"#{int(e)}" for e in evaluations)
            + " with the models it scored: see the Models page."
        )
    if models or evaluations:
        st.page_link("../pages/models.py", label="Models page", icon=":material/model_training:")
    specimens = result.get("specimens", result.get("imported_specimens"))
    images = result.get("images", result.get("imported_images"))
    if images is not None:
        skipped = f" ({int(result['skipped'])} rows skipped, see the log)" if result.get("skipped") else ""
        clips = f" (frames of {int(result['imported_clips'])} clips)" if result.get("imported_clips") else ""
        st.markdown(
            f"Imported {int(specimens or 0)} specimens and {int(images)} images{clips}{skipped}: see the Data page."
        )
        st.page_link("../pages/data.py", label="Data page", icon=":material/table:")
    if result.get("computed") is not None:
        st.markdown(f"AI output computed for {int(result['computed'])} images.")
    predictions = list(dict.fromkeys(_listed(result.get("prediction_id", [])) + _listed(result.get("predictions", []))))
    if result.get("probability") is not None:
        st.markdown(f"Highest probability {float(result['probability']):.3f}.")
    for prediction_id in predictions:
        if st.button(f"Open prediction #{int(prediction_id)}", key=f"jobs_open_{job.id}_{int(prediction_id)}"):
            st.session_state.pop(_OPEN_CLIP, None)
            st.session_state[_OPEN] = int(prediction_id)
            st.rerun()  # the whole page: the prediction opens above the list
    triages = list(dict.fromkeys(_listed(result.get("triage_id", [])) + _listed(result.get("triages", []))))
    if result.get("frames") is not None:
        st.markdown(f"Triaged a clip of {int(result['frames']):,} frames.")
    for triage_id in triages:
        if st.button(f"Open clip triage #{int(triage_id)}", key=f"jobs_open_clip_{job.id}_{int(triage_id)}"):
            st.session_state.pop(_OPEN, None)
            st.session_state[_OPEN_CLIP] = int(triage_id)
            st.rerun()  # the whole page: the triage opens above the list
    known = {"models", "model", "evaluations", "evaluation_id", "specimens", "imported_specimens", "images"}
    known |= {"imported_images", "skipped", "computed", "prediction_id", "predictions", "probability", *_INTERNAL}
    known |= {"triage_id", "triages", "clip_id", "clips", "frames", "imported_clips"}
    rest = {key: value for key, value in result.items() if key not in known}
    if rest:
        st.text("\n".join(f"{key}: {value}" for key, value in rest.items()))


def _card(job: JobInfo) -> None:
    with st.container(border=True, key=f"jobs_job_{job.id}"):
        job_header(job)
        kind = KINDS[job.kind].label if job.kind in KINDS else job.kind
        parts = [
            kind,
            f"by {job.submitted_by_name or 'the command line'}",
            f"retry of job {job.retry_of}" if job.retry_of else "",
            f"created {_when(job.created_at)}",
            f"started {_when(job.started_at)}",
            f"finished {_when(job.finished_at)} (UTC)",
            f"run time {_duration(job.seconds)}",
            f"on {job.device or '–'} at {job.host or '–'}",
        ]
        st.caption(" · ".join(md_escape(part) for part in parts if part))
        if job.error:
            (st.error if job.state == "failed" else st.warning)(md_escape(job.error))
        _products(job)
        if job.state in ACTIVE:
            st.button("Cancel", key=f"jobs_cancel_{job.id}", on_click=_act, args=("cancel", job.id))
        elif job.state in RETRIABLE:
            st.button("Retry", key=f"jobs_retry_{job.id}", on_click=_act, args=("retry", job.id))
        with st.expander("Log"):
            st.code(job.log_tail or "(no output yet)", language=None)


def _jobs(states: tuple[str, ...], kinds: tuple[str, ...], following: bool) -> None:
    """The list; reran on its own every few seconds while ``following``."""
    if not isinstance(st.session_state.get(USER_KEY), int):
        st.rerun()  # signed out meanwhile: the whole page shows the sign-in form
    if bool(store.active_job_ids()) != following:
        st.rerun()  # a job started, or the last one ended: the whole page, to start or stop following
    notice = st.session_state.get(_NOTICE)
    if notice:
        level, text = notice
        getattr(st, level)(md_escape(text))
    jobs = store.list_jobs(states=states or None, kinds=kinds or None)
    if not jobs:
        st.info("No job matches the filters." if states or kinds else "No job yet: start one on the Models page.")
        return
    st.caption(f"{len(jobs)} job(s), newest first" + (" (the newest 200)" if len(jobs) == 200 else ""))
    for job in jobs:
        _card(job)


left, right = st.columns(2)
states = left.multiselect("State", STATES, key="jobs_states", placeholder="every state")
kinds = right.multiselect(
    "Kind", list(KINDS), format_func=lambda k: KINDS[k].label, key="jobs_kinds", placeholder="every kind"
)

opened = st.session_state.get(_OPEN)
if opened is not None:
    with st.container(border=True):
        st.subheader(f"Prediction #{int(opened)}")
        view = repo.prediction_view(int(opened))
        if view is None:
            st.warning("This prediction is no longer stored.")
        else:
            heatmap_viewer(view, key="jobs_view")
        st.button("Close", key="jobs_open_close", on_click=st.session_state.pop, args=(_OPEN, None))

opened_clip = st.session_state.get(_OPEN_CLIP)
if opened_clip is not None:
    with st.container(border=True):
        st.subheader(f"Clip triage #{int(opened_clip)}")
        clip_view = triage_view(int(opened_clip))
        if clip_view is None:
            st.warning("This clip triage is no longer stored.")
        else:
            triage_viewer(clip_view, key=f"jobs_clip_{clip_view['id']}", user_id=user.id)
        st.button("Close", key="jobs_open_clip_close", on_click=st.session_state.pop, args=(_OPEN_CLIP, None))

following = bool(store.active_job_ids())
st.fragment(_jobs, run_every=REFRESH_SECONDS if following else None)(tuple(states), tuple(kinds), following)
