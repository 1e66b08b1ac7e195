"""Shared UI pieces: pictures embedded in the page, the heatmap viewer and filterable, downloadable tables."""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st
from PIL import Image as PILImage

from app.auth import current_user
from core.data.io import MOSAIC_MAX_PIXELS, read_image
from core.data.preprocess import display_image
from core.heatmaps import five_views, method_title, overlay
from core.heatmaps.render import resize_map, to_uint8
from core.reading import blind_png
from core.settings import workspace_dir
from core.text import md_escape
from core.train import DECISIONS
from db import repo
from services import exports
from services.diagnose import extras_path
from services.jobs.store import JobInfo

__all__ = ["JOB_BADGES", "filterable_table", "heatmap_viewer", "job_header", "open_prediction", "picture"]

_VIEW_SIDE = 900
_ZOOM_SIDE = 2048  # the most pixels per side sent to the browser for pan/zoom (mosaics reach 12,000)


def _fit(array: np.ndarray, side: int = _VIEW_SIDE) -> np.ndarray:
    """Downscale a picture for the browser (the stored files keep full resolution)."""
    image = PILImage.fromarray(array)
    image.thumbnail((side, side), PILImage.Resampling.LANCZOS)
    return np.asarray(image)


@st.cache_data(max_entries=32, show_spinner=False)
def _displayed(path: str, modality: str) -> np.ndarray:
    """The stored image as a person sees it, at most 2,048 px a side. Stored images are content-addressed and never
    change, so moving the opacity slider does not read and preprocess the file again."""
    shown = display_image(read_image(path, max_pixels=MOSAIC_MAX_PIXELS), modality)
    if max(shown.shape[:2]) <= _ZOOM_SIDE:
        return shown
    return _fit(to_uint8(shown), _ZOOM_SIDE).astype(np.float32) / 255.0


def picture(image: np.ndarray | bytes, caption: str = "") -> None:
    """An image inside the page itself, as a ``data:`` URI in what Streamlit sends over the signed-in session's
    websocket, and its caption as plain text. Never ``st.image``: Streamlit keeps those files at ``/media/...`` URLs
    that answer anyone, signed in or not, for as long as the server holds them (after a tab is closed, or for an idle
    session, indefinitely); patient images must not outlive the session or be reachable signed out."""
    png = image if isinstance(image, bytes) else blind_png(image)
    source = "data:image/png;base64," + base64.b64encode(png).decode()
    text = f'<figcaption style="text-align:center;opacity:0.7;font-size:0.875rem">{html.escape(caption)}</figcaption>'
    st.html(
        f'<figure style="margin:0"><img src="{source}" alt="" style="width:100%;height:auto">'
        f"{text if caption else ''}</figure>"
    )


def zoomable_overlay(shown: np.ndarray, heatmap: np.ndarray, alpha: float, title: str, key: str) -> None:
    """The heatmap over the image in a pan/zoom figure (drag to pan, scroll or box to zoom, double-click resets)."""
    picture = _fit(overlay(shown, resize_map(heatmap, shown.shape[:2]), alpha), _ZOOM_SIDE)
    figure = px.imshow(picture, binary_string=True)
    figure.update_layout(
        dragmode="pan",
        height=720,
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        title={"text": title, "font": {"size": 14}},
    )
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    st.plotly_chart(figure, config={"scrollZoom": True, "displaylogo": False}, width="stretch", key=key)


def heatmap_viewer(view: dict, key: str) -> None:
    """Original and heatmap overlay side by side with an opacity slider, for a stored prediction."""
    root = workspace_dir()
    shown = _displayed(str(root / view["image_path"]), view["modality"])
    verdict = DECISIONS[view["task"]][int(view["decision"])]
    st.markdown(
        f"**{md_escape(view['name'])}** · model {md_escape(view['model'])} · probability **{view['probability']:.3f}** "
        f"(threshold {view['threshold']:.3f}) · **{verdict}**"
    )
    if not view.get("heatmap_path"):
        picture(_fit(to_uint8(shown)), "Original")
        return
    heatmap = resize_map(np.load(root / view["heatmap_path"]), shown.shape[:2])
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key=f"{key}_opacity")
    if view.get("mosaic"):
        zoomable_overlay(
            shown, heatmap, alpha, f"{method_title(view['heatmap_method'])}, stitched over the image", key=f"{key}_zoom"
        )
        if view.get("device"):
            st.caption(f"Computed on {view['device'].upper()} in {view.get('seconds') or 0:.1f} s.")
        return
    left, right = st.columns(2)
    with left:
        picture(_fit(to_uint8(shown)), "Original")
    with right:
        picture(
            _fit(overlay(shown, heatmap, alpha)),
            f"{method_title(view['heatmap_method'])}: warm colours = strongest evidence for "
            f"{DECISIONS[view['task']][1]}",
        )
    if view.get("device"):
        st.caption(f"Computed on {view['device'].upper()} in {1000 * (view.get('seconds') or 0):.0f} ms.")
    extras_file = root / extras_path(view["heatmap_path"])
    if extras_file.is_file():
        with np.load(extras_file) as stored:
            extras = {k: stored[k].astype(np.float32) for k in stored.files}
        pictures = five_views(shown, extras["gradcam"], extras["guided"]) if "guided" in extras else {}
        if pictures:
            st.markdown("**The five Grad-CAM views** (as in the FL-CNN paper, fig. 3)")
            for column, (title, view_picture) in zip(st.columns(len(pictures)), pictures.items(), strict=True):
                with column:
                    picture(_fit(view_picture), title)


def filterable_table(
    frame: pd.DataFrame, key: str, file_name: str, *, what: str | None = None, study_id: int | None = None
) -> None:
    """A table with a free-text filter, per-column choice filters for small categorical columns, and CSV export.

    The CSV (the rows as filtered) is built only when downloaded, escaped against spreadsheet formulas and audited
    with the signed-in user, ``what`` the table is (default: the file name) and the ``study_id`` it belongs to
    (``services.exports.table_csv``)."""
    if frame.empty:
        st.info("Nothing here yet.")
        return
    filtered = frame
    text = st.text_input("Filter rows containing", key=f"{key}_text", placeholder="any text, e.g. a patient code")
    if text:
        haystack = filtered.astype(str).apply(lambda col: col.str.contains(text, case=False, regex=False))
        filtered = filtered[haystack.any(axis=1)]
    categorical = [c for c in frame.columns if frame[c].dtype == object and 1 < frame[c].nunique(dropna=True) <= 12]
    if categorical:
        columns = st.columns(min(4, len(categorical)))
        for i, column in enumerate(categorical[:4]):
            options = sorted(str(v) for v in frame[column].dropna().unique())
            chosen = columns[i].multiselect(column, options, key=f"{key}_{column}")
            if chosen:
                filtered = filtered[filtered[column].astype(str).isin(chosen)]
    st.caption(f"{len(filtered)} of {len(frame)} rows")
    st.dataframe(filtered, hide_index=True)
    user = current_user()
    user_id, table = (user.id if user else None), what or file_name.removesuffix(".csv")
    st.download_button(
        "Download CSV",
        lambda: exports.table_csv(filtered, what=table, user_id=user_id, study_id=study_id),
        file_name=file_name,
        mime="text/csv",
        key=f"{key}_download",
        on_click="ignore",
    )


def open_prediction(frame: pd.DataFrame, label: str, key: str, user_id: int | None = None) -> None:
    """Pick one of ``frame``'s predictions (columns ``id``, ``image``) and show it in the heatmap viewer.

    With ``user_id``, only predictions on that user's own uploads open.
    """
    names = dict(zip(frame["id"], frame["image"], strict=True))
    chosen = st.selectbox(label, list(names), format_func=lambda pid: f"#{pid} · {names[pid]}", key=f"{key}_pick")
    view = repo.prediction_view(int(chosen))
    if view and (user_id is None or view["user_id"] == user_id):
        heatmap_viewer(view, key=f"{key}_view")


JOB_BADGES = {  # a job's state -> (badge colour, icon)
    "queued": ("gray", ":material/schedule:"),
    "running": ("blue", ":material/autorenew:"),
    "succeeded": ("green", ":material/check_circle:"),
    "failed": ("red", ":material/error:"),
    "cancelled": ("orange", ":material/block:"),
    "interrupted": ("violet", ":material/warning:"),
}


def job_header(job: JobInfo) -> None:
    """A job's state badge, number and title, and its progress bar with its message (people's text as text)."""
    colour, icon = JOB_BADGES.get(job.state, ("gray", ":material/help:"))
    st.markdown(f":{colour}-badge[{icon} {job.state}] **Job {job.id}** · {md_escape(job.title)}")
    st.progress(min(1.0, max(0.0, job.progress)), text=md_escape(job.message or job.state))
