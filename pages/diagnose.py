"""Diagnose: upload specimen images, get probability, decision and heatmap; reopen earlier results."""

from dataclasses import asdict

import pandas as pd
import streamlit as st

from app.auth import require_role
from app.resources import predictor_for
from app.widgets import heatmap_viewer, open_prediction
from core.data.preprocess import MODALITIES
from core.heatmaps import method_title
from core.heatmaps.mosaic import FAST_METHODS
from core.stats.thresholds import POLICY_TEXT
from core.text import md_escape
from core.train import DECISIONS
from db import repo
from services.diagnose import diagnose_files
from services.mosaic import diagnose_mosaic

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
    index=methods.index("gradcam") if "gradcam" in methods else 0,
    format_func=method_title,
    key="diagnose_method",
    help="\n".join(f"- {summary}" for summary in predictor.methods.values()),
)
st.caption(
    f"Decision threshold {model.threshold:.3f}: {POLICY_TEXT.get(model.threshold_policy, model.threshold_policy)}."
)


def mosaic_flow() -> None:
    """One whole mosaic: the patch classifier slid over it, its stitched heatmap with pan and zoom (seed 002)."""
    st.info(
        f"**{md_escape(model.name)}** is a patch classifier for whole mosaics: it looks at {predictor.image_size} px "
        "windows slid over the mosaic, and the windows' maps are stitched into one heatmap."
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
            bar = st.progress(0.0, text=f"Stitching on {predictor.device_name}…")
            outcome = diagnose_mosaic(
                predictor,
                model,
                file.name,
                file.getvalue(),
                user_id=user.id,
                step=step,
                sigma=None if sigma == 0 else float(sigma),
                mode=mode,
                method=method if mode == "exact" or method in FAST_METHODS else "cam",
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} parts done"),
            )
            bar.empty()
            st.session_state["mosaic_last"] = asdict(outcome)
    last = st.session_state.get("mosaic_last")
    if last and last["error"]:
        st.error(f"**{md_escape(last['name'])}** was not processed: {md_escape(last['error'])}")
    elif last:
        negative, positive = DECISIONS[model.task]
        verdict = positive if last["decision"] else negative
        st.success(
            f"**{md_escape(last['name'])}**: {last['windows']:,} windows, highest window probability "
            f"{last['probability']:.3f} → **{verdict}**; {last['positive_windows']:.1%} of windows at or above "
            f"{last['threshold']:.3f}. {last['mode'].capitalize()} stitching on {predictor.device_name} in "
            f"{last['seconds']:.1f} s."
        )
        view = repo.prediction_view(int(last["prediction_id"]))
        if view:
            heatmap_viewer(view, key="mosaic_view")


if model.task == "aspecific":
    mosaic_flow()
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
        else:
            bar = st.progress(0.0, text=f"Diagnosing {len(files)} image(s) on {predictor.device_name}…")
            options = {}
            if method == "scorecam":  # one forward pass per channel: seconds to minutes per image on a CPU
                inner = st.progress(0.0, text="Score-CAM masked passes")
                options["progress"] = lambda done, total: inner.progress(
                    done / total, text=f"Score-CAM: {done}/{total}"
                )
            outcomes = diagnose_files(
                predictor,
                model,
                [(f.name, f.getvalue()) for f in files],
                user_id=user.id,
                heatmap=method,
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} image(s) done"),
                options=options,
            )
            bar.empty()
            if method == "scorecam":
                inner.empty()
            st.session_state["diagnose_last"] = [asdict(o) for o in outcomes]
            st.session_state["diagnose_last_task"] = model.task
            st.session_state["diagnose_last_device"] = predictor.device_name

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
            shown = pd.DataFrame({"id": [o["prediction_id"] for o in done], "image": [o["name"] for o in done]})
            open_prediction(shown, "Show heatmap of", key="diagnose_show", user_id=user.id)


recent = st.session_state.get("diagnose_last") or st.session_state.get("mosaic_last")
with st.expander("Your earlier diagnoses", expanded=not recent):
    history = repo.recent_predictions(user_id=user.id)
    if history.empty:
        st.caption("None yet.")
    else:
        st.dataframe(history, hide_index=True)
        open_prediction(history, "Open", key="diagnose_history", user_id=user.id)
