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

__all__ = [
    "JOB_BADGES",
    "clicked_frames",
    "filterable_table",
    "heatmap_viewer",
    "job_header",
    "live_viewer",
    "open_prediction",
    "picture",
    "triage_viewer",
]

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


def _frame_shown(frame: np.ndarray) -> np.ndarray:
    """A CLE frame as it is shown: [0, 1] floats (the model's own scaling of the frame's grey levels)."""
    from core.data.io import Image

    return display_image(Image(np.ascontiguousarray(frame), name="frame", format="NPY"), "CLE")


def clicked_frames(event: object) -> list[int]:
    """The frame numbers of the points selected on a clip's timeline (Streamlit's plotly selection event): each
    point carries its frame as ``customdata`` (a number, or a one-element list); the frames line's points also by
    their index."""
    selection = event.get("selection", {}) if isinstance(event, dict) else {}
    frames = []
    for point in selection.get("points", []) if isinstance(selection, dict) else []:
        data = point.get("customdata")
        data = data[0] if isinstance(data, list | tuple) and data else data
        if isinstance(data, int | float) and not isinstance(data, bool):
            frames.append(int(data))
        elif point.get("curve_number") == 0 and isinstance(point.get("point_index"), int):
            frames.append(int(point["point_index"]))
    return frames


def triage_viewer(view: dict, key: str, user_id: int | None) -> None:
    """A stored clip triage: its figures, the probability of every frame over time with the threshold (click a
    point to see that frame), a scrubber over the frames, the top frames with their heatmaps, and downloads."""
    from services.clips import clip_frame, triage_probabilities

    negative, positive = DECISIONS[view["task"]]
    probabilities = triage_probabilities(view)
    n = len(probabilities)
    fps = view.get("fps")
    share = view["n_positive"] / n if n else 0.0
    st.markdown(
        f"**{md_escape(view['name'])}** · {n:,} frames"
        + (f" at {fps:g} frames/s ({n / fps:.1f} s)" if fps else "")
        + f" · model {md_escape(view['model'])} · **{view['n_positive']:,} {positive}** frames ({share:.0%}) at "
        f"threshold {view['threshold']:.3f} · highest probability {view['max_probability']:.3f}"
    )
    if view.get("seconds"):
        st.caption(
            f"Triaged on {str(view.get('device') or '').upper()} in {view['seconds']:.1f} s "
            f"({n / view['seconds']:.1f} frames/s"
            + (f", {n / view['seconds'] / fps:.1f} x the probe's rate)" if fps else ")")
        )
    tops = {int(t["frame"]): t for t in view["top"]}
    x = np.arange(n) / fps if fps else np.arange(n)
    figure = px.line(x=x, y=probabilities, labels={"x": "seconds" if fps else "frame", "y": "probability"})
    figure.update_traces(mode="lines+markers", marker={"size": 4}, customdata=np.arange(n), name="frames")
    figure.add_hline(y=view["threshold"], line_dash="dot", annotation_text=f"threshold {view['threshold']:.3f}")
    if tops:
        figure.add_scatter(
            x=[x[i] for i in tops], y=[probabilities[i] for i in tops], mode="markers", name="top frames",
            marker={"size": 11, "symbol": "star"}, customdata=list(tops),
        )  # fmt: skip
    figure.update_layout(height=260, margin={"l": 0, "r": 0, "t": 10, "b": 0}, yaxis_range=[0, 1], showlegend=False)
    event = st.plotly_chart(
        figure, key=f"{key}_timeline", on_select="rerun", selection_mode="points", config={"displaylogo": False}
    )
    picked = clicked_frames(event)
    slider_key = f"{key}_frame"
    if picked and st.session_state.get(f"{key}_picked") != picked[0]:
        st.session_state[f"{key}_picked"] = picked[0]
        st.session_state[slider_key] = picked[0]  # a clicked point moves the scrubber
    if n:
        if slider_key not in st.session_state:
            st.session_state[slider_key] = next(iter(tops), int(np.argmax(probabilities)))
        index = st.slider("Frame", 0, n - 1, key=slider_key) if n > 1 else 0
        p = float(probabilities[index])
        label = positive if p >= view["threshold"] else negative
        when = f" · {index / fps:.2f} s" if fps else ""
        left, right = st.columns(2)
        top = tops.get(index)
        root = workspace_dir()
        if top is not None:
            shown = np.asarray(PILImage.open(root / top["image_path"]), dtype=np.float32) / 255.0
        else:
            shown = _frame_shown(clip_frame(view, index))
        with left:
            picture(_fit(to_uint8(shown)), f"Frame {index}{when} · probability {p:.3f} · {label}")
        if top is not None and top.get("heatmap_path") and (root / top["heatmap_path"]).is_file():
            heatmap = resize_map(np.load(root / top["heatmap_path"]), shown.shape[:2])
            with right:
                picture(_fit(overlay(shown, heatmap, 0.45)), f"{method_title(view['heatmap_method'])}: frame {index}")
        elif tops:
            right.caption("Heatmaps are kept for the top frames (stars on the timeline).")
    if tops:
        st.markdown(f"**The {len(tops)} most {positive} frames**, at least half a second apart")
        root = workspace_dir()
        for column, (index, top) in zip(st.columns(len(tops)), tops.items(), strict=True):
            shown = np.asarray(PILImage.open(root / top["image_path"]), dtype=np.float32) / 255.0
            if top.get("heatmap_path") and (root / top["heatmap_path"]).is_file():
                shown_map = overlay(shown, resize_map(np.load(root / top["heatmap_path"]), shown.shape[:2]), 0.45)
            else:
                shown_map = to_uint8(shown)
            with column:
                picture(_fit(shown_map, 300), f"frame {index} · p {top['probability']:.3f}")
    left, right = st.columns(2)
    left.download_button(
        "Per-frame CSV",
        lambda: exports.clip_frames_csv(view, user_id=user_id),
        file_name=f"clip-{view['id']}-frames.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
    )
    if tops:
        right.download_button(
            "Top frames (PNG, zip)",
            lambda: exports.clip_top_frames(view, user_id=user_id),
            file_name=f"clip-{view['id']}-top-frames.zip",
            mime="application/zip",
            key=f"{key}_zip",
            on_click="ignore",
        )


def live_viewer(view: dict, key: str, user_id: int) -> None:
    """The live view of a stored clip triage (issue 15): the clip replayed at its frame rate as the probe would stream
    it (:class:`core.live.Replay`: the newest frame that has arrived, stale ones dropped), each shown frame with the
    model's own map over it, the running probability and decision over the last half second, and whether this
    machine keeps up. Only the triage's owner may play it (:func:`services.clips.live_source`, audited). Any widget
    interaction reruns the page, which ends the replay: that is all Stop does."""
    from app.resources import predictor_for
    from core.data.clips import ClipError, open_clip
    from core.data.io import ImageError
    from core.live import DEFAULT_FPS, DEFAULT_WINDOW_S, Replay
    from services.clips import live_source

    negative, positive = DECISIONS[view["task"]]
    fps = view.get("fps") or DEFAULT_FPS
    st.markdown("**Live view**")
    st.caption(
        f"The clip at {fps:g} frames/s, as the probe streams it: each frame is scored when it arrives, and a frame "
        "that arrives while the model is still busy is dropped, as on a live display. The decision is the mean "
        f"probability of the last {DEFAULT_WINDOW_S:g} s against the threshold {view['threshold']:.3f}."
    )
    left, middle, right = st.columns([1, 1, 2], vertical_alignment="center")
    play = left.button("Play live", key=f"{key}_play", type="primary", icon=":material/play_arrow:")
    middle.button("Stop", key=f"{key}_stop", icon=":material/stop:")  # its rerun ends a replay that runs
    with_map = right.toggle("Heatmap overlay", value=True, key=f"{key}_map")
    last = f"{key}_last"
    if not play:
        if st.session_state.get(last):
            st.caption(f"Last replay: {st.session_state[last]}")
        return
    source = live_source(user_id, int(view["id"]))
    if source is None:
        st.error("Only whoever triaged this clip can play it. Open one of your own clips under Your earlier clips.")
        return
    predictor = predictor_for(source.model)
    frame_slot, decision_slot, pace_slot = st.empty(), st.empty(), st.empty()
    try:
        with open_clip(source.path, source.name) as clip:
            replay = Replay(predictor, clip, heatmap="default" if with_map else None)
            for shown in replay:
                image = _frame_shown(shown.frame)
                pixels = (
                    to_uint8(image)
                    if shown.heatmap is None
                    else overlay(image, resize_map(shown.heatmap, image.shape[:2]), 0.45)
                )
                with frame_slot.container():
                    picture(
                        _fit(pixels, 600),
                        f"Live: frame {shown.index} · {shown.arrival:.2f} s · probability {shown.probability:.3f}"
                        + (f" · {method_title(replay.method)}" if shown.heatmap is not None else ""),
                    )
                decision_slot.markdown(
                    f"Last {replay.window_s:g} s: probability **{shown.running_probability:.3f}** · "
                    f"**{positive if shown.decision else negative}**"
                )
                stats = replay.stats()
                st.session_state[last] = stats.summary()
                pace_slot.markdown(f":{'green' if stats.keeps_up else 'orange'}[{stats.summary()}]")
    except (ClipError, ImageError) as error:
        st.error(f"The clip cannot be played: {md_escape(str(error))}")


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
