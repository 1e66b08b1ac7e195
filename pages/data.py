"""Data (PI): the study database as filterable tables with CSV download, any stored prediction reopened, and a cohort
imported (a zip of a cohort folder uploaded here, or a folder on the server) as a job on the cluster."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table, open_prediction
from core.data.manifest import LABEL_COLUMNS, REQUIRED_COLUMNS
from core.text import md_escape
from db import repo
from services.jobs import service, store
from services.jobs.incoming import discard_upload, keep_upload

_SOURCES = {"zip": "Upload a .zip", "folder": "A folder on the server"}
_QUEUED = "data_import_job"

user = require_role("pi")
st.title("Data")
tabs = st.tabs([name.capitalize() for name in repo.TABLES])
frames = {name: repo.table(name) for name in repo.TABLES}
for tab, (name, frame) in zip(tabs, frames.items(), strict=True):
    with tab:
        filterable_table(frame, key=f"data_{name}", file_name=f"{name}.csv")

if not frames["predictions"].empty:
    st.subheader("Open a prediction")
    open_prediction(frames["predictions"], "Prediction", key="data_open")


def _import(params: dict[str, Any], kept: str | None) -> None:
    """Queue the import; a refusal is shown at once (and the kept upload removed), the queued job after the form."""
    st.session_state.pop(_QUEUED, None)
    try:
        st.session_state[_QUEUED] = service.submit("import", params, user_id=user.id)
    except service.JobNotLaunched as error:
        st.warning(md_escape(str(error)))
        st.session_state[_QUEUED] = error.job_id
    except ValueError as error:
        if kept:
            discard_upload(kept)
        st.error(f"Nothing was imported: {md_escape(str(error))}")


st.subheader("Import a cohort")
st.caption(
    "A cohort folder holds its images and a manifest.csv, one row per image (columns "
    + md_escape(", ".join(REQUIRED_COLUMNS))
    + ", at least one label column of "
    + md_escape(", ".join(LABEL_COLUMNS))
    + "; optionally split, mask_path, site and frames: a CLE row may name a clip, whose picked frames become "
    "specimens). Patients of rows without a split get one by the fractions below. The import runs as a job on the "
    "cluster."
)
source = st.radio("From", list(_SOURCES), format_func=_SOURCES.get, horizontal=True, key="data_import_source")
with st.form("data_import_form", clear_on_submit=True):
    upload, folder = None, ""
    if source == "zip":
        upload = st.file_uploader("The cohort folder as a .zip", type=["zip"], key="data_import_zip")
    else:
        folder = st.text_input("Folder on the server (holding manifest.csv)", key="data_import_folder")
    columns = st.columns(4)
    split = [
        column.number_input(f"{part} fraction", 0.0, 1.0, default, step=0.05, key=f"data_import_{part}")
        for column, part, default in zip(columns[:3], ("train", "val", "test"), (0.6, 0.15, 0.25), strict=True)
    ]
    seed = columns[3].number_input("Split seed", 0, 2**31 - 1, 0, key="data_import_seed")
    submitted = st.form_submit_button("Import", type="primary")
if submitted:
    params: dict[str, Any] = {"split": [float(x) for x in split], "seed": int(seed)}
    if source == "zip" and upload is None:
        st.warning("Choose a .zip file first.")
    elif source == "zip" and upload is not None:
        try:
            kept = keep_upload(upload.getvalue(), upload.name, kind="cohort")
        except ValueError as error:
            st.error(f"Nothing was imported: {md_escape(str(error))}")
        else:
            _import({**params, "zip": kept, "name": upload.name}, kept)
    elif not folder.strip():
        st.warning("Type the folder's path on the server first.")
    else:
        _import({**params, "folder": folder.strip()}, None)
queued = store.get_job(st.session_state[_QUEUED]) if _QUEUED in st.session_state else None
if queued is not None:
    st.success(f"Job {queued.id} queued: {md_escape(queued.title)}. You may leave this page; it runs on the cluster.")
    st.page_link(
        "../pages/jobs.py", label=f"Follow job {queued.id} on the Jobs page", icon=":material/pending_actions:"
    )
