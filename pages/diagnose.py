"""Diagnose: upload specimen images, get probability, decision and heatmap; reopen earlier results. A tumor call is
followed by the grade and Ki-67 models of the same modality (seed 003's cascade, ``services.diagnose``), each call
shown with its own model's heatmap in the same viewer as the tumor call's.

Most heatmaps are computed here at once. Long ones run as jobs on the cluster: a whole mosaic's stitched heatmap, and
Score-CAM (one job per image). "Your jobs" follows the signed-in user's own such jobs (a fragment that reads them again
every few seconds while one is queued or running), cancels them, and opens a finished job's result; nobody sees or
cancels another user's jobs here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pandas as pd
import streamlit as st

from app.auth import USER_KEY, current_user, require_role
from app.resources import predictor_for
from app.widgets import heatmap_viewer, job_header, live_viewer, open_prediction, triage_viewer
from core.data.preprocess import MODALITIES
from core.heatmaps import method_title
from core.heatmaps.mosaic import FAST_METHODS
from core.stats.thresholds import POLICY_TEXT
from core.text import md_escape
from core.train import DECISIONS
from core.triage import default_method
from db import repo
from services.clips import recent_triages, triage_view
from services.diagnose import cascade_lines, cascade_models, diagnose_files
from services.jobs import service, store
from services.jobs.incoming import discard_upload, keep_upload
from services.jobs.store import ACTIVE, JobInfo

REFRESH_SECONDS = 2
_JOB_KINDS = ("mosaic", "scorecam", "clip")
_JOBS_SHOWN = 10
_FOLLOW = "diagnose_follow"  # jobs this session queued: their result opens when they succeed
_OPEN = "diagnose_job_open"  # the prediction of a job opened under "Your jobs"
_OPEN_CASCADE = "diagnose_job_cascade"  # its grade and Ki-67 calls after a tumor call, and the modality
_OPEN_CLIP = "diagnose_clip_open"  # the clip triage opened (a clip job's result, or from the history)
_TASK_NAMES = {"grade": "grade", "ki67": "Ki-67"}  # the cascade's tasks as the page names them
_CLIP_TYPES = ["tif", "tiff", "mp4", "avi", "mov", "mkv", "webm", "zip"]

user = require_role("pi", "clinician")
st.title("Diagnose")

registered = repo.list_models()
# Models of data without an upload path here (many-channel spectral spots) are named, not offered.
models = [m for m in registered if m.modality in MODALITIES]
elsewhere = [m for m in registered if m.modality not in MODALITIES]
if elsewhere:
    st.caption(
        "Not offered here, as their images cannot be uploaded on this page: "
        + ", ".join(f"{md_escape(m.name)} ({md_escape(m.modality)})" for m in elsewhere)
        + ". Their localisation tables are on the Models page."
    )
if not models:
    st.warning(
        "No model is registered yet. Build the demo workspace with `make run`, or train one with "
        "`python -m core train`, then reload this page."
    )
    st.stop()

modalities = sorted({m.modality for m in models}, key=MODALITIES.index)
left, middle, right = st.columns([1, 3, 1])
modality = left.radio("Image type", modalities, horizontal=True, key="diagnose_modality")
candidates = {m.id: m for m in models if m.modality == modality}
default = next((i for i, m in enumerate(candidates.values()) if m.task == "tumor"), 0)
model_id = middle.selectbox(
    "Model",
    list(candidates),
    index=default,
    format_func=lambda i: f"{candidates[i].name} · {candidates[i].task} · threshold {candidates[i].threshold:.3f}",
    key="diagnose_model",
)
model = candidates[model_id]
predictor = predictor_for(model)
methods = list(predictor.methods)
method = right.selectbox(
    "Heatmap",
    methods,
    index=methods.index(default_method(methods, model.architecture)) if methods else 0,
    format_func=method_title,
    key="diagnose_method",
    help="\n".join(f"- {summary}" for summary in predictor.methods.values()),
)
st.caption(
    f"Decision threshold {model.threshold:.3f}: {POLICY_TEXT.get(model.threshold_policy, model.threshold_policy)}."
)
followers = cascade_models(model)  # a tumor call is followed by grade and Ki-67 (seed 003's cascade)
if followers:
    stages = [
        f"{_TASK_NAMES[task]} ({md_escape(m.name)})" if m else f"{_TASK_NAMES[task]} (no {modality} model registered)"
        for task, m in followers.items()
    ]
    st.caption(f"An image called tumor goes on to {' and '.join(stages)}.")


def _cascade_maps(calls: Sequence[Mapping[str, Any]], key: str) -> None:
    """Each assessed cascade call's heatmap over the image, in the viewer the tumor call's map opens in, labelled with
    its task and method; calls stored without one (no heatmap asked for, or an older result) show none."""
    for call in calls:
        view = repo.prediction_view(int(call["prediction_id"])) if call.get("heatmap") else None
        if view is None or view["user_id"] != user.id or not view["heatmap_path"]:
            continue
        task = _TASK_NAMES[call["task"]]
        label = f"{task[:1].upper()}{task[1:]} model ({method_title(view['heatmap_method'])})"
        st.markdown(f"**{md_escape(label)}**")
        heatmap_viewer(view, key=f"{key}_{call['prediction_id']}")


def _queue(kind: str, name: str, data: bytes, params: dict[str, Any], upload: str) -> tuple[int | None, str]:
    """Keep an uploaded file and queue its job: (job id, "") or (None, why it was refused). A job queued while the
    cluster cannot be reached is followed like any other; it starts when the cluster is back."""
    try:
        kept = keep_upload(data, name, kind=upload)
    except ValueError as error:
        return None, str(error)
    try:
        job_id = service.submit(kind, {**params, "file": kept, "name": name}, user_id=user.id)
    except service.JobNotLaunched as error:
        job_id = error.job_id
    except ValueError as error:
        discard_upload(kept)
        return None, str(error)
    st.session_state[_FOLLOW] = [*st.session_state.get(_FOLLOW, []), job_id]
    return job_id, ""


def _queued_notice(key: str, result: str, history: str) -> None:
    """What became of the file a flow last queued (kept under ``key``): refused with its reason, or its job and
    where its ``result`` (a phrase with its verb) will be."""
    queued = st.session_state.get(key)
    if queued and queued["error"]:
        st.error(f"**{md_escape(queued['name'])}** was not processed: {md_escape(queued['error'])}")
    elif queued:
        st.success(
            f"**{md_escape(queued['name'])}** is queued as job {queued['job']}: {result} under Your jobs when it is "
            f"done. You may leave this page; the result lands in {history}."
        )


def mosaic_flow() -> None:
    """One whole mosaic: the patch classifier slid over it, its stitched heatmap with pan and zoom (seed 002). The
    stitching runs as a job on the cluster; its result opens under "Your jobs" and stays in the history."""
    st.info(
        f"**{md_escape(model.name)}** is a patch classifier for whole mosaics: it looks at {predictor.image_size} px "
        "windows slid over the mosaic, and the windows' maps are stitched into one heatmap. The stitching runs as a "
        "job on the cluster: you may leave this page meanwhile."
    )
    with st.form("mosaic_form", clear_on_submit=True):
        file = st.file_uploader(
            f"One {modality} mosaic: PNG, TIFF (8/16-bit, float) or NumPy .npy, up to 150 megapixels",
            type=["png", "tif", "tiff", "npy"],
            key="mosaic_file",
        )
        one, two, three = st.columns(3)
        step = one.select_slider("Window step (px)", [25, 50, 100], value=50, key="mosaic_step")
        sigma = two.select_slider(
            "Centre weighting σ",
            [0, 1, 2.5, 5, 7, 10],
            value=5,
            key="mosaic_sigma",
            help="Gaussian weight of each window's centre (standard deviation window/σ); 0 = plain averaging",
        )
        mode = three.radio(
            "Computation",
            ["fast", "exact"],
            horizontal=True,
            key="mosaic_mode",
            help="fast: the network runs once over the whole mosaic and windows share it; exact: every window on "
            "its own (the reference; minutes on a CPU for large mosaics)",
        )
        submitted = st.form_submit_button("Stitch heatmap", type="primary")
    if submitted:
        if file is None:
            st.warning("Choose a mosaic file first.")
        else:
            params = {
                "model": model.name,
                "step": step,
                "sigma": None if sigma == 0 else float(sigma),
                "mode": mode,
                "method": method if mode == "exact" or method in FAST_METHODS else "cam",
            }
            job_id, refused = _queue("mosaic", file.name, file.getvalue(), params, "mosaic")
            st.session_state["mosaic_queued"] = {"name": file.name, "job": job_id, "error": refused}
    _queued_notice("mosaic_queued", "its stitched heatmap opens", "your earlier diagnoses")


def clip_flow() -> None:
    """A CLE clip (seed 000): every frame's diagnostic probability over time, the most diagnostic frames with their
    heatmaps. The triage runs as a job on the cluster; its result opens under "Your jobs" and stays in the history."""
    st.info(
        f"**{md_escape(model.name)}** scores every frame of a clip (diagnostic or not: blood, motion), and shows the "
        "most diagnostic frames with their heatmaps. A clip is a multi-page TIFF, an MP4, AVI, MOV or MKV video, or a "
        "zip of frames. The triage runs as a job on the cluster: you may leave this page meanwhile."
    )
    with st.form("clip_form", clear_on_submit=True):
        file = st.file_uploader("A CLE clip", type=_CLIP_TYPES, key="clip_file")
        top = st.number_input("Top frames to show with heatmaps", 1, 20, 5, key="clip_top")
        submitted = st.form_submit_button("Triage clip", type="primary")
    if submitted:
        if file is None:
            st.warning("Choose a clip file first.")
        else:
            params = {"model": model.name, "top": int(top), "heatmap": method}
            job_id, refused = _queue("clip", file.name, file.getvalue(), params, "clip")
            st.session_state["clip_queued"] = {"name": file.name, "job": job_id, "error": refused}
    _queued_notice("clip_queued", "its timeline and top frames open", "your earlier clips")


clips_offered = modality == "CLE" and model.task != "aspecific"
upload_clip = clips_offered and (
    st.radio("Upload", ["Frames", "A clip"], horizontal=True, key="diagnose_cle_what") == "A clip"
)
if model.task == "aspecific":
    mosaic_flow()
elif upload_clip:
    clip_flow()
else:
    with st.form("diagnose_form", clear_on_submit=True):
        files = st.file_uploader(
            f"{modality} specimen images: PNG, JPEG, TIFF (8/16-bit, float) or NumPy .npy; several at once",
            type=["png", "jpg", "jpeg", "tif", "tiff", "npy"],
            accept_multiple_files=True,
            key="diagnose_files",
        )
        submitted = st.form_submit_button("Diagnose", type="primary")

    if submitted:
        if not files:
            st.warning("Choose one or more image files first.")
        elif method == "scorecam":  # one forward pass per channel, seconds to minutes per image: a job per image
            queued, refused = [], []
            for f in files:
                job_id, error = _queue(
                    "scorecam", f.name, f.getvalue(), {"model": model.name, "method": method}, "image"
                )
                if job_id is None:
                    refused.append({"name": f.name, "error": error})
                else:
                    queued.append(job_id)
            st.session_state["diagnose_last"] = refused
            st.session_state["diagnose_queued"] = queued
        else:
            bar = st.progress(0.0, text=f"Diagnosing {len(files)} image(s) on {predictor.device_name}…")
            outcomes = diagnose_files(
                predictor,
                model,
                [(f.name, f.getvalue()) for f in files],
                user_id=user.id,
                heatmap=method,
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} image(s) done"),
                cascade={task: m and (predictor_for(m), m) for task, m in followers.items()} if followers else None,
            )
            bar.empty()
            st.session_state["diagnose_last"] = [asdict(o) for o in outcomes]
            st.session_state["diagnose_last_task"] = model.task
            st.session_state["diagnose_last_modality"] = model.modality
            st.session_state["diagnose_last_device"] = predictor.device_name
            st.session_state.pop("diagnose_queued", None)

    queued = st.session_state.get("diagnose_queued")
    if queued:
        st.success(
            f"Score-CAM is queued as {'job' if len(queued) == 1 else 'jobs'} {', '.join(map(str, queued))}, one per "
            "image (seconds to minutes each): follow them under Your jobs. You may leave this page; the results land "
            "in your earlier diagnoses."
        )
    results = st.session_state.get("diagnose_last", [])
    if results:
        negative, positive = DECISIONS[st.session_state.get("diagnose_last_task", "tumor")]
        for outcome in results:
            if outcome["error"]:
                st.error(f"**{md_escape(outcome['name'])}** was not diagnosed: {md_escape(outcome['error'])}")
        done = [o for o in results if not o["error"]]
        if done:
            st.subheader("Result" if len(done) == 1 else f"Results for {len(done)} images")
            table = pd.DataFrame(
                {
                    "image": [o["name"] for o in done],
                    "probability": [o["probability"] for o in done],
                    "decision": [positive if o["decision"] else negative for o in done],
                    "ms": [1000 * o["seconds"] for o in done],
                }
            )
            st.dataframe(
                table,
                hide_index=True,
                column_config={
                    "probability": st.column_config.ProgressColumn(
                        "probability", min_value=0.0, max_value=1.0, format="%.3f"
                    ),
                    "ms": st.column_config.NumberColumn("time (ms)", format="%.0f"),
                },
            )
            st.caption(
                f"Computed on {st.session_state.get('diagnose_last_device', 'CPU')}; time is diagnosis plus heatmap "
                "per image."
            )
            cascaded = [o for o in done if o.get("cascade")]
            if cascaded:
                st.markdown("**Grade and Ki-67** after the tumor call")
                for o in cascaded:
                    lines = cascade_lines(o["cascade"], st.session_state.get("diagnose_last_modality", modality))
                    st.markdown(f"**{md_escape(o['name'])}**: " + " · ".join(md_escape(line) for line in lines))
                    if any(c.get("heatmap") for c in o["cascade"]):
                        with st.expander(
                            f"Where the grade and Ki-67 models' evidence lies in {md_escape(o['name'])}",
                            expanded=len(cascaded) == 1,
                        ):
                            _cascade_maps(o["cascade"], key=f"diagnose_cascade_{o['prediction_id']}")
            shown = pd.DataFrame({"id": [o["prediction_id"] for o in done], "image": [o["name"] for o in done]})
            open_prediction(shown, "Show heatmap of", key="diagnose_show", user_id=user.id)


def _cancel(job_id: int) -> None:
    """The Cancel button's callback: only the signed-in user's own job."""
    acting = current_user()
    job = store.get_job(job_id)
    if acting is not None and job is not None and job.submitted_by == acting.id:
        service.cancel(job_id, user_id=acting.id)


def _job_row(job: JobInfo) -> None:
    with st.container(border=True, key=f"diagnose_job_{job.id}"):
        job_header(job)
        if job.error:
            st.error(md_escape(job.error))
        prediction_id, triage_id = job.result.get("prediction_id"), job.result.get("triage_id")
        if job.state in ACTIVE:
            st.button("Cancel", key=f"diagnose_job_cancel_{job.id}", on_click=_cancel, args=(job.id,))
        elif (
            job.state == "succeeded"
            and (prediction_id, triage_id) != (None, None)
            and st.button("Open result", key=f"diagnose_job_open_{job.id}")
        ):
            _open_result(job)
            st.rerun()  # the whole page: the result opens below the list


def _own_jobs(following: bool) -> None:
    """The user's own recent mosaic and Score-CAM jobs; reran on its own every few seconds while ``following``."""
    if not isinstance(st.session_state.get(USER_KEY), int):
        st.rerun()  # signed out meanwhile: the whole page shows the sign-in form
    if bool(store.list_jobs(states=ACTIVE, kinds=_JOB_KINDS, user_id=user.id, limit=1)) != following:
        st.rerun()  # one started or the last one ended: the whole page, to open its result and stop following
    for job in store.list_jobs(kinds=_JOB_KINDS, user_id=user.id, limit=_JOBS_SHOWN):
        _job_row(job)


def _open_result(job: JobInfo) -> None:
    """Open a succeeded job's result: a clip's triage, or a prediction (one result open at a time)."""
    if job.result.get("triage_id") is not None:
        st.session_state.pop(_OPEN, None)
        st.session_state[_OPEN_CLIP] = int(job.result["triage_id"])
    elif job.result.get("prediction_id") is not None:
        st.session_state.pop(_OPEN_CLIP, None)
        st.session_state[_OPEN] = int(job.result["prediction_id"])
        st.session_state[_OPEN_CASCADE] = (job.result.get("cascade") or [], job.result.get("modality", ""))


def _open_finished() -> None:
    """Open the result of a job this session queued once it succeeded (the page was left open while it ran)."""
    still = []
    for job_id in st.session_state.get(_FOLLOW, []):
        job = store.get_job(job_id)
        if job is not None and job.state == "succeeded":
            _open_result(job)
        elif job is not None and job.state in ACTIVE:
            still.append(job_id)
    st.session_state[_FOLLOW] = still


def _opened_clip(key: str) -> None:
    """The opened clip triage, when it is the signed-in user's own."""
    opened = st.session_state.get(_OPEN_CLIP)
    view = triage_view(int(opened)) if opened is not None else None
    if view is not None and view["user_id"] == user.id:
        with st.container(border=True):
            triage_viewer(view, key=f"{key}_{view['id']}", user_id=user.id)
            live_viewer(view, key=f"{key}_{view['id']}_live", user_id=user.id)
            st.button("Close", key=f"{key}_close", on_click=st.session_state.pop, args=(_OPEN_CLIP, None))


if store.list_jobs(kinds=_JOB_KINDS, user_id=user.id, limit=1):
    st.subheader("Your jobs")
    _open_finished()
    following = bool(store.list_jobs(states=ACTIVE, kinds=_JOB_KINDS, user_id=user.id, limit=1))
    st.fragment(_own_jobs, run_every=REFRESH_SECONDS if following else None)(following)
    opened = st.session_state.get(_OPEN)
    view = repo.prediction_view(int(opened)) if opened is not None else None
    if view is not None and view["user_id"] == user.id:
        with st.container(border=True):
            heatmap_viewer(view, key="diagnose_job_view")
            calls, called_on = st.session_state.get(_OPEN_CASCADE) or ([], "")
            if calls:
                st.markdown(" · ".join(md_escape(line) for line in cascade_lines(calls, called_on)))
                _cascade_maps(calls, key="diagnose_job_cascade")
            st.button("Close", key="diagnose_job_close", on_click=st.session_state.pop, args=(_OPEN, None))
    _opened_clip("diagnose_job_clip")

if clips_offered:
    clips = recent_triages(user_id=user.id)
    with st.expander("Your earlier clips", expanded=False):
        if not clips:
            st.caption("None yet.")
        else:
            table = pd.DataFrame(clips).drop(columns=["by"])
            st.dataframe(table, hide_index=True, key="diagnose_clips_table")
            names = {c["id"]: c["clip"] for c in clips}
            chosen = st.selectbox(
                "Clip", list(names), format_func=lambda i: f"#{i} · {names[i]}", key="diagnose_clips_pick"
            )
            st.button(
                "Open clip", key="diagnose_clips_open", on_click=st.session_state.__setitem__, args=(_OPEN_CLIP, chosen)
            )
    if not store.list_jobs(kinds=_JOB_KINDS, user_id=user.id, limit=1):
        _opened_clip("diagnose_history_clip")

recent = st.session_state.get("diagnose_last") or st.session_state.get(_OPEN) is not None
with st.expander("Your earlier diagnoses", expanded=not recent):
    history = repo.recent_predictions(user_id=user.id)
    if history.empty:
        st.caption("None yet.")
    else:
        st.dataframe(history, hide_index=True)
        open_prediction(history, "Open", key="diagnose_history", user_id=user.id)
