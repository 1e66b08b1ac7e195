"""Models (PI): every registered model with how it was trained, its validation and test figures, its training curve,
and the localisation evaluations stored with it (the seed papers' ablation tables, with example maps)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table, picture
from core.settings import workspace_dir
from core.text import md_escape
from db import repo
from services import exports
from services.localization import study_titles

user = require_role("pi")
st.title("Models")

_COLUMNS = {
    "row": "Method",
    "image_auc": "Image AUC",
    "pixel_auc": "Pixel AUC",
    "pixel_auc_ci": "Pixel AUC 95 % CI",
    "best_dice": "Best Dice",
    "best_dice_threshold": "at",
    "mean_acc": "Mean acc",
    "mean_iu": "Mean IU",
    "fw_iu": "fw IU",
    "dice": "Dice",
    "precision": "Region precision",
    "recall": "Region recall",
    "windows": "Windows / mosaic",
    "seconds": "s / mosaic",
    "model": "Model",
}

models = repo.list_models()
evaluations = {m.id: repo.model_evaluations(m.id) for m in models}
if not models:
    st.info("No models yet. Train one with `python -m core train`, or run a seed study (below).")
    st.stop()

summary = pd.DataFrame([{**m.summary(), "recipe": m.metrics.get("recipe", "flcnn")} for m in models])
filterable_table(summary.drop(columns=["checkpoint_sha256"]), key="models_table", file_name="models.csv")

by_id = {m.id: m for m in models}
evaluated = {mid for mid, rows in evaluations.items() if rows}
first = next((m.id for m in models if m.id in evaluated), models[0].id)
chosen = st.selectbox(
    "Model",
    list(by_id),
    index=list(by_id).index(first),
    format_func=lambda mid: f"{by_id[mid].name}" + ("  · evaluated" if mid in evaluated else ""),
    key="models_pick",
)
model = by_id[chosen]

left, right = st.columns([1, 2])
with left:
    st.markdown(
        f"**{md_escape(model.architecture)}** · task **{md_escape(model.task)}** · modality "
        f"**{md_escape(model.modality)}** · {model.image_size} px  \nthreshold {model.threshold:.3f} "
        f"({md_escape(model.threshold_policy)})  \nrecipe **{md_escape(model.metrics.get('recipe', 'flcnn'))}** · "
        f"trained on {md_escape(model.config.get('trained_on', '?'))}"
    )
    figures = {k: model.metrics.get(k) for k in ("val_auc", "test_auc", "val_sensitivity", "val_specificity")}
    st.dataframe(
        pd.DataFrame([{"figure": k, "value": v} for k, v in figures.items() if v is not None]), hide_index=True
    )
    with st.expander("Training configuration"):
        st.json({k: v for k, v in model.config.items() if k not in ("channel_mean", "channel_std")})
with right:
    history = pd.DataFrame(model.metrics.get("history") or [])
    if not history.empty:
        figure = go.Figure()
        for column in ("loss", "val_loss", "val_auc"):
            if column in history:
                figure.add_scatter(x=history["epoch"], y=history[column], mode="lines+markers", name=column)
        kept = model.metrics.get("kept_epoch")
        if kept:
            figure.add_vline(x=kept, line_dash="dot", annotation_text="kept")
        figure.update_layout(height=300, margin=dict(t=30, b=30), xaxis_title="epoch", title="Training")
        st.plotly_chart(figure, key="models_history")

for evaluation in evaluations.get(model.id, []):
    report = evaluation["report"]
    st.subheader(md_escape(evaluation["title"]))
    splits = evaluation["dataset"].get("splits", {})
    st.caption(
        f"Stored {evaluation['created_at']:%Y-%m-%d %H:%M} · {md_escape(evaluation['dataset'].get('kind', ''))} set "
        f"{md_escape(evaluation['dataset'].get('size', ''))} px · "
        + ", ".join(f"{md_escape(k)} {v['images']} ({v['positive']} positive)" for k, v in splits.items())
        + f" · scored on {md_escape(report.get('scored_on', ''))}"
    )
    for number, table in enumerate(report.get("tables", [])):
        st.markdown(f"**{md_escape(table['mask_set'].capitalize())} masks**, threshold {table['threshold']:g}")
        frame = pd.DataFrame(table["rows"])
        frame["pixel_auc_ci"] = frame["pixel_auc_ci"].map(
            lambda ci: f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and None not in ci else ""
        )
        frame = frame[[c for c in _COLUMNS if c in frame]].rename(columns=_COLUMNS).round(3)
        st.dataframe(frame, hide_index=True, key=f"models_eval_{evaluation['id']}_{number}")
        st.download_button(
            "Download CSV",
            lambda frame=frame, what=f"evaluation {evaluation['id']} {table['mask_set']}": exports.table_csv(
                frame, what=what, user_id=user.id
            ),
            file_name=f"evaluation-{evaluation['id']}-{table['mask_set']}.csv",
            mime="text/csv",
            key=f"models_eval_{evaluation['id']}_{number}_csv",
            on_click="ignore",
        )
        examples = table.get("examples") or []
        if examples:
            with st.expander(f"Example maps ({len(examples)} held-out positive images)"):
                root = workspace_dir()
                for example in examples:
                    pictures = {"image": example["image"], "mask": example["mask"], **example["maps"]}
                    present = {k: root / v for k, v in pictures.items() if (root / v).is_file()}
                    columns = st.columns(min(6, len(present)) or 1)
                    for index, (title, path) in enumerate(present.items()):
                        with columns[index % len(columns)]:
                            picture(path.read_bytes(), title)
                    st.divider()

st.subheader("Run a seed study")
st.markdown(
    "Each study trains the seed paper's model, its ablations and a ResNet-18 baseline from image-level labels on a "
    "synthetic set with known masks, scores every map against the masks, and stores the table here. From a shell "
    "in the repository (minutes on a CPU):"
)
st.code("\n".join(f"python -m core localization-study {name}   # {title}" for name, title in study_titles().items()))
