"""Models (PI): every registered model with how it was trained, its validation and test figures, its training curve,
and the localisation evaluations stored with it (the seed papers' ablation tables, with example maps). Two forms start
long work as jobs on the cluster: training a model (every architecture and recipe ``python -m core train`` offers, from
the imported cohort, a localisation set or RCM mosaics on the server) and a seed paper's localisation study; the
Jobs page follows them. A third compares two models of one task on the same specimens (seed 003's Table 2 / Fig. 4,
FL against WL) as a job, and shows the stored comparisons."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table, picture
from core.metrics.pointing import INTENSITY_STATISTICS
from core.models import list_models as architectures
from core.settings import workspace_dir
from core.stats.thresholds import POLICIES, POLICY_TEXT
from core.text import md_escape
from core.train import RECIPES, TASKS, TrainConfig
from db import repo
from db.models import MODALITIES
from db.repo import ModelInfo
from services import exports, pointing
from services.jobs import service, store
from services.jobs.store import ACTIVE
from services.localization import study_titles
from services.model_compare import (
    COMPARABLE_TASKS,
    comparison_figure,
    comparison_table,
    comparisons_among,
    is_comparison,
)

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
    "dice_spot_mean": "Dice per spot",
    "dice_spot_sd": "SD",
    "spot_auc": "Spot AUC",
    "slide_auc": "Slide AUC",
    "froc": "FROC",
    "patch_accuracy": "Patch accuracy at 0.5",
    "windows": "Windows / mosaic",
    "seconds": "s / mosaic",
    "model": "Model",
}


def _registered(models: list[ModelInfo], stored: dict[int, list[dict[str, Any]]]) -> None:
    """The models table, and the chosen model's figures, curve and stored evaluations (``stored``, by model id;
    comparisons of two models are shown by :func:`_comparisons`)."""
    evaluations = {mid: [e for e in rows if not is_comparison(e)] for mid, rows in stored.items()}
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

    _pointing(model)

    for evaluation in evaluations.get(model.id, []):
        report = evaluation["report"]
        st.subheader(md_escape(evaluation["title"]))
        dataset = evaluation["dataset"]
        splits = dataset.get("splits", {})
        st.caption(
            f"Stored {evaluation['created_at']:%Y-%m-%d %H:%M} · {md_escape(dataset.get('kind', ''))} set "
            f"{md_escape(dataset.get('size', ''))} px · "
            + ", ".join(f"{md_escape(k)} {v['images']} ({v['positive']} positive)" for k, v in splits.items())
            + f" · scored on {md_escape(report.get('scored_on', ''))}"
        )
        if report.get("classification"):
            st.markdown("**Classification of the test split** (threshold chosen on validation), model sizes")
            classified = pd.DataFrame(report["classification"])[
                ["name", "architecture", "test_accuracy", "test_auc", "parameters"]
            ].rename(
                columns={
                    "name": "Model",
                    "architecture": "Architecture",
                    "test_accuracy": "Accuracy",
                    "test_auc": "AUC",
                    "parameters": "Parameters",
                }
            )
            st.dataframe(classified.round(3), hide_index=True, key=f"models_eval_{evaluation['id']}_classification")
        for number, table in enumerate(report.get("tables", [])):
            named = f"**{md_escape(table['set'])}** ({md_escape(table['split'])} split) · " if table.get("set") else ""
            st.markdown(
                f"{named}**{md_escape(table['mask_set'].capitalize())} masks**, threshold {table['threshold']:g}"
            )
            table_name = table.get("set") or table["mask_set"]
            frame = pd.DataFrame(table["rows"])
            frame["pixel_auc_ci"] = frame["pixel_auc_ci"].map(
                lambda ci: f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and None not in ci else ""
            )
            frame = frame[[c for c in _COLUMNS if c in frame]].rename(columns=_COLUMNS).round(3)
            st.dataframe(frame, hide_index=True, key=f"models_eval_{evaluation['id']}_{number}")
            st.download_button(
                "Download CSV",
                lambda frame=frame, what=f"evaluation {evaluation['id']} {table_name}": exports.table_csv(
                    frame, what=what, user_id=user.id
                ),
                file_name=f"evaluation-{evaluation['id']}-{table_name}.csv",
                mime="text/csv",
                key=f"models_eval_{evaluation['id']}_{number}_csv",
                on_click="ignore",
            )
            _figures(table.get("figures") or {}, key=f"models_eval_{evaluation['id']}_{number}")
            examples = table.get("examples") or []
            if examples:
                held = "held-out " if table.get("split", "test") == "test" else ""
                with st.expander(f"Example maps ({len(examples)} {held}images with the feature)"):
                    root = workspace_dir()
                    for example in examples:
                        pictures = {"image": example["image"], "mask": example["mask"], **example["maps"]}
                        present = {k: root / v for k, v in pictures.items() if (root / v).is_file()}
                        columns = st.columns(min(6, len(present)) or 1)
                        for index, (title, path) in enumerate(present.items()):
                            with columns[index % len(columns)]:
                                picture(path.read_bytes(), title)
                        st.divider()


def _figures(figures: dict[str, Any], key: str) -> None:
    """A table's stored curves (seed 004: Figure S3's spot ROC and the pixel ROC), plotly figures the study wrote
    under the workspace; a missing or unreadable file is said, not raised."""
    root = workspace_dir()
    for name, figure in figures.items():
        path = root / str(figure.get("figure", ""))
        try:
            chart = pio.from_json(path.read_text())
        except (OSError, ValueError):
            st.caption(f"The figure {md_escape(figure.get('title', name))} is missing from the workspace.")
            continue
        st.plotly_chart(chart, key=f"{key}_{name}")
        if figure.get("scored_on"):
            st.caption(f"Scored on {md_escape(figure['scored_on'])}; the curve's points: {md_escape(figure['csv'])}.")


def _pointing(model: ModelInfo) -> None:
    """The pointing game stored with an FL tumor model: its map's peak against the brightest pixel, and its AUC
    against simple brightness figures, on the test split."""
    report = model.metrics.get("pointing")
    if not report:
        if pointing.applies(model.task, model.modality):
            st.caption("No pointing game is stored with this model (it was registered before it was measured).")
        return
    st.subheader("Does the heatmap find the tumor?")
    for line in pointing.summary_lines(report):
        st.markdown(md_escape(line))
    aucs = report.get("intensity_aucs") or {}
    if aucs:
        with st.expander("Every brightness figure's AUC (no model)"):
            st.dataframe(
                pd.DataFrame([{"figure": INTENSITY_STATISTICS.get(k, k), "AUC": round(v, 3)} for k, v in aucs.items()]),
                hide_index=True,
                key="models_pointing_aucs",
            )
    st.caption(
        "The peak is the map's highest pixel after mapping it back to the photo; the brightest spot is the highest "
        "pixel of the lightly smoothed photo inside the specimen. A map that only finds the brightest spot adds "
        "nothing a surgeon cannot see. The CIs resample specimens."
    )


_SOURCES = {
    "cohort": "The imported cohort",
    "data": "A localisation set (folder on the server)",
    "mosaics": "RCM mosaics (folder on the server)",
}


def _submit(kind: str, params: dict[str, Any], key: str) -> None:
    """Queue a job from a form; the refusal (nothing queued) is shown at once, the queued job after the form.

    A second press of the button with the same settings while that job is still queued or running queues nothing."""
    last = st.session_state.get(f"{key}_last")
    if last and last["params"] == params:
        job = store.get_job(last["job"])
        if job is not None and job.state in ACTIVE:
            st.info(f"Job {job.id} with these settings is already {job.state}; nothing new was queued.")
            return
    st.session_state.pop(f"{key}_last", None)
    try:
        job_id = service.submit(kind, params, user_id=user.id)
    except service.JobNotLaunched as error:
        st.warning(md_escape(str(error)))
        job_id = error.job_id
    except ValueError as error:
        st.error(f"Nothing was queued: {md_escape(str(error))}")
        return
    st.session_state[f"{key}_last"] = {"params": params, "job": job_id}


def _queued(key: str) -> None:
    """The job the form last queued, and where to follow it."""
    last = st.session_state.get(f"{key}_last")
    job = store.get_job(last["job"]) if last else None
    if job is None:
        return
    st.success(f"Job {job.id} queued: {md_escape(job.title)}. You may leave this page; it runs on the cluster.")
    st.page_link("../pages/jobs.py", label=f"Follow job {job.id} on the Jobs page", icon=":material/pending_actions:")


def _train_form() -> None:
    st.subheader("Train a model")
    source = st.radio("Train on", list(_SOURCES), format_func=_SOURCES.get, horizontal=True, key="models_train_source")
    defaults = TrainConfig()
    names = architectures()
    with st.form("models_train_form"):
        one, two, three, four = st.columns(4)
        architecture = one.selectbox(
            "Architecture", names, index=names.index(defaults.architecture), key="models_train_architecture"
        )
        recipe = two.selectbox(
            "Recipe",
            [None, *RECIPES],
            format_func=lambda r: "the architecture's own" if r is None else r,
            key="models_train_recipe",
            help="\n".join(f"- {r.description}" for r in RECIPES.values()),
        )
        task = three.selectbox(
            "Task", list(TASKS), format_func=lambda t: TASKS[t][0], key="models_train_task", disabled=source != "cohort"
        )
        modality = four.selectbox("Modality", MODALITIES, key="models_train_modality", disabled=source != "cohort")
        one, two, three, four = st.columns(4)
        epochs = one.number_input("Epochs", 1, 1000, defaults.epochs, key="models_train_epochs")
        image_size = two.number_input("Image size (px)", 16, 1024, defaults.image_size, key="models_train_image_size")
        batch_size = three.number_input("Batch size", 1, 1024, defaults.batch_size, key="models_train_batch_size")
        lr = four.number_input(
            "Learning rate", 1e-6, 0.99, defaults.lr, step=1e-4, format="%.5f", key="models_train_lr"
        )
        one, two = st.columns(2)
        policies = ["task", *(p for p in POLICIES if p != "fixed")]
        policy = one.selectbox(
            "Threshold policy",
            policies,
            format_func=lambda p: (
                "the task's paper rule (closest for grade and Ki-67, sens90 otherwise)"
                if p == "task"
                else f"{p}: {POLICY_TEXT[p]}"
            ),
            key="models_train_policy",
        )
        name = two.text_input(
            "Name (optional)",
            key="models_train_name",
            placeholder="e.g. FL-tumor-resnet18-v2",
            help="Letters, digits, '.', '_' and '-'. Empty: modality, task, architecture and the time.",
        )
        folder, patches = "", None
        if source != "cohort":
            folder = st.text_input(f"{_SOURCES[source]}: its path", key="models_train_folder")
        if source == "mosaics":
            patches = st.number_input("Patches per mosaic", 1, 100_000, 200, key="models_train_patches")
            st.caption("RCM mosaics train a patch classifier: task aspecific, modality RCM.")
        elif source == "data":
            st.caption("A localisation set decides the task, modality, channels and image size itself.")
        submitted = st.form_submit_button("Queue training", type="primary")
    if submitted:
        params: dict[str, Any] = {
            "architecture": architecture,
            "task": task,
            "modality": modality,
            "epochs": int(epochs),
            "image_size": int(image_size),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "threshold_policy": None if policy == "task" else policy,
        }
        if recipe:
            params["recipe"] = recipe
        if name.strip():
            params["name"] = name.strip()
        if source != "cohort":
            params[source] = folder.strip()
        if patches is not None:
            params["patches"] = int(patches)
        if source != "cohort" and not folder.strip():
            st.error(f"Nothing was queued: give the path of the folder on the server ({_SOURCES[source]}).")
        else:
            _submit("train", params, "models_train")
    _queued("models_train")


def _study_form() -> None:
    st.subheader("Run a localisation study")
    st.markdown(
        "Each study trains the seed paper's model, its ablations and a ResNet-18 baseline from image-level labels on "
        "a synthetic set with known masks, scores every map against the masks, and stores the table here (minutes on "
        "a CPU). Empty fields take the study's own settings."
    )
    titles = study_titles()
    own = "the study's own"
    with st.form("models_study_form"):
        study = st.selectbox("Study", list(titles), format_func=titles.get, key="models_study_pick")
        one, two, three, four = st.columns(4)
        epochs = one.number_input("Epochs", 1, 1000, None, placeholder=own, key="models_study_epochs")
        size = two.number_input("Image size (px)", 16, 8192, None, placeholder=own, key="models_study_size")
        seed = three.number_input("Seed", 0, 2**31 - 1, 0, key="models_study_seed")
        bootstrap = four.number_input("Bootstrap resamples", 0, 100_000, 500, key="models_study_bootstrap")
        columns = st.columns(3)
        counts = [
            column.number_input(f"{split} images", 1, 100_000, None, placeholder=own, key=f"models_study_{split}")
            for column, split in zip(columns, ("train", "val", "test"), strict=True)
        ]
        submitted = st.form_submit_button("Queue study", type="primary")
    if submitted:
        params: dict[str, Any] = {"study": study, "seed": int(seed), "bootstrap": int(bootstrap)}
        if epochs is not None:
            params["epochs"] = int(epochs)
        if size is not None:
            params["size"] = int(size)
        given = [c for c in counts if c is not None]
        if given and len(given) < 3:
            st.error("Nothing was queued: give all three image counts (train, val, test), or none for the study's own.")
        else:
            if given:
                params["counts"] = [int(c) for c in given]
            _submit("localization-study", params, "models_study")
    _queued("models_study")
    with st.expander("From a shell"):
        st.code(
            "\n".join(f"python -m core localization-study {name}   # {title}" for name, title in study_titles().items())
        )


_SPLITS = {"test": "test", "val": "validation", "train": "training"}


def _compare_form(models: list[ModelInfo]) -> None:
    """Seed 003's Table 2 / Fig. 4 as a job: two registered models of one task, the split and the resamples."""
    st.subheader("Compare two models (seed 003, Table 2 / Fig. 4)")
    st.markdown(
        "Both models score the split's specimens that have the task's label and an image in each model's modality "
        "(FL for an FL model, WL for a WL model); each decides at its registered threshold. The table gives AUC, "
        "accuracy, sensitivity, specificity and F1 with 95 % bootstrap CIs (specimens resampled) and paired "
        "permutation tests of the differences (DeLong for the AUC, McNemar for sensitivity and specificity beside)."
    )
    by_id = {m.id: m for m in models}
    tasks = [t for t in COMPARABLE_TASKS if sum(m.task == t for m in models) >= 2]
    if not tasks:
        st.info("Register two models of one task (e.g. an FL and a WL grade model) to compare them.")
        return

    def label(mid: int) -> str:
        return f"{by_id[mid].name} ({by_id[mid].modality}, {by_id[mid].architecture})"

    task = st.selectbox("Task", tasks, format_func=lambda t: TASKS[t][0], key="models_compare_task")
    candidates = [m.id for m in models if m.task == task]
    one, two = st.columns(2)
    first = one.selectbox("Model A (e.g. the FL-CNN)", candidates, format_func=label, key="models_compare_a")
    second = two.selectbox(
        "Model B (e.g. the WL-CNN)", [c for c in candidates if c != first], format_func=label, key="models_compare_b"
    )
    one, two, three, four = st.columns(4)
    split = one.selectbox("Split", list(_SPLITS), format_func=_SPLITS.get, key="models_compare_split")
    bootstrap = two.number_input("Bootstrap resamples", 100, 20_000, 1000, key="models_compare_bootstrap")
    permutations = three.number_input("Permutations", 100, 100_000, 10_000, key="models_compare_permutations")
    seed = four.number_input("Seed", 0, 2**31 - 1, 0, key="models_compare_seed")
    if st.button("Queue comparison", type="primary", key="models_compare_submit"):
        params = {
            "model_a": by_id[first].name,
            "model_b": by_id[second].name if second is not None else "",
            "split": split,
            "bootstrap": int(bootstrap),
            "permutations": int(permutations),
            "seed": int(seed),
        }
        _submit("compare-models", params, "models_compare")
    _queued("models_compare")


def _comparisons(evaluations: dict[int, list[dict[str, Any]]]) -> None:
    """The stored comparisons among ``evaluations`` (by model id): the chosen one's Table 2, Fig. 4 and the table
    as CSV."""
    stored = comparisons_among(e for rows in evaluations.values() for e in rows)
    if not stored:
        st.caption("No comparison is stored yet: queue one above.")
        return
    by_id = {e["id"]: e for e in stored}

    def label(eid: int) -> str:
        models = by_id[eid]["report"]["models"]
        return (
            f"{models['a']['name']} vs {models['b']['name']} · {by_id[eid]['report']['task']} · "
            f"{by_id[eid]['report']['split']} split · {by_id[eid]['created_at']:%Y-%m-%d %H:%M}"
        )

    chosen = st.selectbox("Stored comparisons", list(by_id), format_func=label, key="models_compare_pick")
    evaluation = by_id[chosen]
    report = evaluation["report"]
    a, b = report["models"]["a"], report["models"]["b"]
    st.markdown(
        f"**{md_escape(a['name'])}** ({md_escape(a['modality'])}, threshold {a['threshold']:.3f}) vs "
        f"**{md_escape(b['name'])}** ({md_escape(b['modality'])}, threshold {b['threshold']:.3f}) · "
        f"{md_escape(report['task'])} on {report['n_cases']} {md_escape(report['split'])} specimens "
        f"({report['n_positive']} positive)"
    )
    st.caption(
        f"Stored {evaluation['created_at']:%Y-%m-%d %H:%M} · {report.get('resamples', '?')} bootstrap resamples, "
        f"{report.get('permutations', '?')} permutations, seed {report.get('seed', '?')}"
    )
    table = comparison_table(report)
    st.dataframe(table, hide_index=True, key=f"models_compare_{chosen}_table")
    st.plotly_chart(comparison_figure(report), key=f"models_compare_{chosen}_figure")
    st.download_button(
        "Download CSV",
        lambda: exports.table_csv(table, what=f"comparison {chosen}", user_id=user.id),
        file_name=f"comparison-{chosen}.csv",
        mime="text/csv",
        key=f"models_compare_{chosen}_csv",
        on_click="ignore",
    )


models = repo.list_models()
evaluations = {m.id: repo.model_evaluations(m.id) for m in models}  # read once, for the tables and the comparisons
if models:
    _registered(models, evaluations)
else:
    st.info("No models yet: train one with the form below, or run a localisation study (further below).")
_train_form()
_study_form()
if models:
    _compare_form(models)
    _comparisons(evaluations)
