"""Results (PI): the CNN against the readers of a study (or of uploaded CSVs), with the statistics of a diagnostic
accuracy study: Fig. 2 (ROC with its band, readers as operating points with CI crosses), Table 1 with CIs,
differences and p-values, MRMC, error analysis, per-reader and per-case tables."""

from __future__ import annotations

import shlex

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table
from core.stats.report import AnalysisError, analyze_reads, read_predictions, read_reads
from core.stats.thresholds import POLICIES
from core.text import md_escape, plot_escape
from db import repo
from services import exports, studies
from services import results as results_service

user = require_role("pi")
METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
_POLICY_CHOICES = {"registered": "the model's registered threshold (chosen on validation)"} | {
    p: f"{p}: chosen on these cases (optimistic)" for p in POLICIES if p != "fixed"
}


@st.cache_data(max_entries=16, show_spinner=False)
def _study_results(study_id, version, models, policy, bootstrap, permutations, seed):
    """Cached per study version (reads and predictions), models and settings; the version makes new reads count."""
    return results_service.study_results(
        study_id, models=dict(models), policy=policy, bootstrap=bootstrap, permutations=permutations, seed=seed
    )


def _cell(summary: dict) -> str:
    estimate, (low, high) = summary["estimate"], summary["ci"]
    if estimate is None or estimate != estimate:
        return "n/a"
    return f"{estimate:.3f} ({low:.3f}-{high:.3f})"


def _figure_config(key: str) -> dict:
    fmt = st.session_state.get("results_figure_format", "png")
    return {"displaylogo": False, "toImageButtonOptions": {"format": fmt, "filename": key, "scale": 2}}


def _roc_figure(report: dict, title: str) -> go.Figure:
    """Fig. 2: the model's ROC with its bootstrap band, every reader and the readers' mean with CI crosses."""
    band, model = report["roc_band"], report["raters"]["model"]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=band["fpr"], y=band["high"], line={"width": 0}, showlegend=False, hoverinfo="skip"))
    figure.add_trace(
        go.Scatter(
            x=band["fpr"],
            y=band["low"],
            fill="tonexty",
            fillcolor="rgba(31,119,180,0.18)",
            line={"width": 0},
            name="95 % band",
            hoverinfo="skip",
        )
    )
    roc = model["roc"]
    figure.add_trace(
        go.Scatter(
            x=roc["fpr"], y=roc["tpr"], mode="lines", line={"color": "#1f77b4"}, name=f"CNN, AUC {_cell(model['auc'])}"
        )
    )
    for name, rater in report["raters"].items():
        if name == "model":
            marker = {"symbol": "star", "size": 14, "color": "#1f77b4"}
            label = f"CNN at threshold {report['threshold']['value']:.3f}"
        else:
            marker = {"symbol": "diamond" if name == "readers_mean" else "circle", "size": 11}
            label = "readers' mean" if name == "readers_mean" else plot_escape(name)
        sens, spec = rater["sensitivity"], rater["specificity"]
        x, y = 1 - spec["estimate"], sens["estimate"]
        figure.add_trace(
            go.Scatter(
                x=[x],
                y=[y],
                mode="markers",
                marker=marker,
                name=label,
                error_x=_bar(spec["estimate"], spec["ci"]),
                error_y=_bar(sens["estimate"], sens["ci"]),
            )
        )
    figure.update_layout(
        title=title,
        xaxis={"title": "1 - specificity", "range": [-0.01, 1.01], "constrain": "domain"},
        yaxis={"title": "sensitivity", "range": [-0.01, 1.01], "scaleanchor": "x", "constrain": "domain"},
        height=560,
        legend={"x": 0.55, "y": 0.05},
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
    )
    return figure


def _bar(estimate: float, ci: list[float]) -> dict:
    """A CI cross arm (1 - specificity moves the other way, but its interval is as wide on each side)."""
    return {"type": "data", "symmetric": False, "array": [ci[1] - estimate], "arrayminus": [estimate - ci[0]]}


def _table_one(report: dict) -> pd.DataFrame:
    rows = []
    for name, rater in report["raters"].items():
        row = {"rater": {"model": "CNN", "readers_mean": "readers' mean"}.get(name, name)}
        row |= {metric: _cell(rater[metric]) for metric in METRICS}
        row["auc"] = _cell(rater["auc"]) if "auc" in rater else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _comparisons(report: dict) -> pd.DataFrame:
    rows = []
    for c in report["comparisons"]:
        rows.append(
            {
                "CNN vs": "readers' mean" if c["b"] == "readers_mean" else c["b"],
                "metric": c["metric"],
                "difference": round(c["difference"], 4) if c["difference"] == c["difference"] else None,
                "95 % CI": f"{c['ci'][0]:.3f} to {c['ci'][1]:.3f}",
                "p": c["p_value"],
                "test": c["method"],
                "McNemar p": c.get("mcnemar_p"),
            }
        )
    return pd.DataFrame(rows)


def _errors(report: dict) -> pd.DataFrame:
    per = report["error_analysis"]["per_reader"]
    return pd.DataFrame(
        [
            {"reader": r, "reader's errors": e["errors"], "of them, CNN right": e["corrected_by_model"],
             "share corrected": e["fraction"]}
            for r, e in per.items()
        ]
    )  # fmt: skip


def _per_case(cases: pd.DataFrame, reads: pd.DataFrame, threshold: float) -> pd.DataFrame:
    table = cases.copy()
    table["CNN decision"] = (table["score"] >= threshold).astype(int)
    if not reads.empty:
        wide = reads.pivot(index="case_id", columns="reader_id", values="label")
        table = table.join(wide, on="case_id")
    return table


def _arm_panel(
    name: str, report: dict, cases: pd.DataFrame, reads: pd.DataFrame, key: str, study_id: int | None = None
) -> None:
    if "raters" not in report:
        st.info("Nothing to analyse in this arm yet (see the notes above).")
        return
    threshold = report["threshold"]
    model = md_escape(report.get("model") or "model")
    st.caption(
        f"{model} at threshold {threshold['value']:.3f} ({threshold['description']}); "
        f"{report['n_cases']} cases ({report['n_positive']} positive); CIs: {report['method']['ci']} bootstrap of "
        f"cases ({report['method']['resamples']} resamples); p: {report['method']['permutations']} paired permutations."
    )
    st.plotly_chart(
        _roc_figure(report, f"{plot_escape(name)}: CNN against readers"),
        config=_figure_config(f"roc-{key}"),
        key=f"{key}_roc",
    )
    st.markdown("**Table 1**: estimates with 95 % CIs")
    filterable_table(_table_one(report), key=f"{key}_t1", file_name=f"table1-{key}.csv", study_id=study_id)
    st.markdown("**CNN minus reader**: paired differences")
    filterable_table(_comparisons(report), key=f"{key}_cmp", file_name=f"comparisons-{key}.csv", study_id=study_id)
    if "model_vs_readers" in report:
        mvr = report["model_vs_readers"]
        st.markdown(
            "**AUC, CNN vs the readers' mean** (readers random, Hillis single-treatment OR): "
            f"CNN {mvr['model_auc']:.3f}, readers {mvr['mean_reader_auc']:.3f}, difference "
            f"{mvr['difference']:+.3f} (95 % CI {mvr['ci'][0]:.3f} to {mvr['ci'][1]:.3f}), p = {mvr['p_value']:.4f}."
        )
    st.markdown("**Error analysis**: of each reader's wrong answers, how many the CNN got right")
    st.dataframe(_errors(report), hide_index=True)
    st.markdown("**Per case**")
    filterable_table(
        _per_case(cases, reads, threshold["value"]), key=f"{key}_cases", file_name=f"cases-{key}.csv", study_id=study_id
    )


def _cross_panel(cross: dict, key: str, study_id: int) -> None:
    """Table 1's cross-arm rows (seed 003): the FL-CNN against the readers of the WL arm and against the WL-CNN, on
    the cases both arms share."""
    (first, arm_a), (second, arm_b) = cross["arms"].items()
    cnn = f"{first}-CNN"
    st.subheader(f"{cnn} against the {second} arm: Table 1's cross-arm rows")
    st.caption(
        f"{cnn} = {md_escape(cross['models'][first])} (arm {md_escape(arm_a)}) at threshold "
        f"{cross['thresholds'][first]:.3f}; {second}-CNN = {md_escape(cross['models'][second])} (arm "
        f"{md_escape(arm_b)}) at threshold {cross['thresholds'][second]:.3f}; {cross['n_cases']} cases both arms "
        f"share ({cross['n_positive']} positive). Same CIs and paired tests as each arm's own Table 1."
    )
    parts = {"vs_readers": f"{cnn} vs readers of the {second} arm", "vs_model": f"{cnn} vs {second}-CNN"}
    for part, title in parts.items():
        report = cross[part]
        st.markdown(f"**{title}**")
        if report is None:
            st.info(f"No reader has finished the {second} arm yet.")
            continue
        table = _table_one(report).replace({"rater": {"CNN": cnn}})
        filterable_table(table, key=f"{key}_{part}_t1", file_name=f"table1-{key}-{part}.csv", study_id=study_id)
        comparisons = _comparisons(report).rename(columns={"CNN vs": f"{cnn} vs"})
        filterable_table(
            comparisons, key=f"{key}_{part}_cmp", file_name=f"comparisons-{key}-{part}.csv", study_id=study_id
        )


def _mrmc_panel(mrmc: dict) -> None:
    st.subheader("MRMC ROC analysis (Obuchowski-Rockette, Hillis ddf, jackknife covariance)")
    auc = pd.DataFrame(mrmc["auc"]).rename_axis("reader").reset_index()
    st.dataframe(auc, hide_index=True)
    rows = []
    for name, title in (("rrrc", "random readers, random cases"), ("frrc", "fixed readers, random cases"),
                        ("rrfc", "random readers, fixed cases")):  # fmt: skip
        a = mrmc[name]
        stat = f"X2 = {a['chi2']:.3f}" if name == "frrc" else f"F = {a['f']:.3f} ({a['ndf']:.0f}, {a['ddf']:.2f})"
        rows.append({"analysis": title, "difference": a.get("difference"), "95 % CI": a.get("ci"), "test": stat,
                     "p": a["p_value"]})  # fmt: skip
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption("Mean AUC per arm: " + ", ".join(f"{md_escape(k)} {v:.3f}" for k, v in mrmc["mean_auc"].items()))


def _from_study() -> None:
    all_studies = studies.list_studies()
    models = [m for m in repo.list_models() if m.task in ("tumor", "grade", "ki67")]
    if not all_studies:
        st.info("No study yet: create one on the Studies page, or upload CSV files.")
        return
    by_id = {s.id: s for s in all_studies}
    study = by_id[
        st.selectbox(
            "Study",
            list(by_id),
            format_func=lambda i: by_id[i].title + (" (SIMULATED reads)" if by_id[i].simulated else ""),
            key="results_study",
        )
    ]
    columns = st.columns(len(study.arms) + 1)
    chosen = {}
    for column, arm in zip(columns, study.arms, strict=False):
        names = {m.id: m.name for m in models if m.task == study.task and m.modality == arm.modality}
        pick = column.selectbox(
            f"Model for arm {md_escape(arm.name)}",
            list(names) or [None],
            format_func=lambda i, names=names: names.get(i, "no model registered"),
            key=f"results_model_{study.id}_{arm.name}",
        )
        if pick is not None:
            chosen[arm.name] = pick
    policy = columns[-1].selectbox(
        "Operating threshold", list(_POLICY_CHOICES), format_func=_POLICY_CHOICES.get, key="results_policy"
    )
    with st.expander("Settings"):
        bootstrap = st.number_input("Bootstrap resamples", 100, 10000, 1000, 100, key="results_bootstrap")
        permutations = st.number_input("Permutations", 100, 100000, 10000, 1000, key="results_permutations")
        seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="results_seed")
        st.radio("Figure download format", ("png", "svg"), horizontal=True, key="results_figure_format")
    version = results_service.study_version(study.id)
    seen = st.session_state.setdefault("results_audited", set())
    if study.id not in seen:
        results_service.note_results_viewed(study.id, user.id)
        seen.add(study.id)
    with st.status("Computing the results...", expanded=False) as status:
        result = _study_results(
            study.id,
            version,
            tuple(sorted(chosen.items())),
            None if policy == "registered" else policy,
            int(bootstrap),
            int(permutations),
            int(seed),
        )
        status.update(label="Results", state="complete")
    for note in result.notes:
        (st.warning if "SIMULATED" in note else st.info)(md_escape(note))
    tabs = st.tabs([f"Arm {md_escape(name)}" for name in result.arms])
    for tab, (name, report) in zip(tabs, result.arms.items(), strict=True):
        with tab:
            if report["unfinished"]:
                st.caption(
                    "Not yet in this arm's analysis (cases answered): "
                    + ", ".join(f"{md_escape(r)} ({n})" for r, n in report["unfinished"].items())
                )
            inputs = report["inputs"]
            _arm_panel(name, report, inputs.cases, inputs.reads, key=f"results_{study.id}_{name}", study_id=study.id)
            _reproduce(study.id, name, report, None if policy == "registered" else policy, int(seed))
    if result.cross:
        _cross_panel(result.cross, key=f"results_{study.id}_cross", study_id=study.id)
    if result.mrmc:
        _mrmc_panel(result.mrmc)
    if study.question == "regions":
        _experts_section(study, version, int(bootstrap), int(seed))


def _reproduce(study_id: int, arm: str, report: dict, policy: str | None, seed: int) -> None:
    """The arm's model scores as a predictions CSV (built and audited when downloaded), and the command that gives
    this arm's Table 1 from them and the Studies page's reads export."""
    if "raters" not in report:
        return
    choice = f"--policy {policy}" if policy else f"--threshold {float(report['threshold']['value'])!r}"
    st.download_button(
        "Model scores (predictions CSV for python -m core analyze)",
        lambda: exports.predictions_csv(study_id, arm, model=report["model"], user_id=user.id),
        f"study-{study_id}-{arm}-predictions.csv",
        "text/csv",
        key=f"results_{study_id}_{arm}_predictions",
        on_click="ignore",
    )
    method = report["method"]
    st.code(
        f"python -m core analyze --predictions P.csv --reads R.csv --arm {shlex.quote(arm)} {choice} "
        f"--bootstrap {method['resamples']} --permutations {method['permutations']} --seed {seed} --out report.json",
        language="bash",
    )


_VERDICTS = {
    "below": "below the experts' range",
    "within": "within the experts' range",
    "above": "above the experts' range",
}


@st.cache_data(max_entries=8, show_spinner=False)
def _experts_report(study_id, version, arm, layer, models, methods, bootstrap, seed):
    """Cached per study version (a drawing is a read, so a new one counts), arm, layer, rows and settings."""
    return studies.heatmaps_vs_experts(
        study_id, arm, layer, models=list(models), methods=list(methods), n_boot=bootstrap, seed=seed
    )


def _experts_figure(table: pd.DataFrame) -> go.Figure:
    """Dice of every row against its reference with its CI, models and readers on one axis, the readers' range
    shaded."""
    figure = go.Figure()
    readers = table[table["kind"] == "reader"]["dice"].dropna()
    if not readers.empty:
        figure.add_hrect(
            y0=readers.min(),
            y1=readers.max(),
            fillcolor="rgba(44,160,44,0.15)",
            line_width=0,
            annotation_text="readers' range",
            annotation_position="top left",
        )
    styles = {
        "model": ("models, against the consensus of all readers", "star", "#1f77b4"),
        "reader": ("readers, against the consensus of the others", "circle", "#2ca02c"),
    }
    for kind, (name, symbol, color) in styles.items():
        part = table[table["kind"] == kind]
        if part.empty:
            continue
        figure.add_trace(
            go.Scatter(
                x=[plot_escape(row) for row in part["row"]],
                y=part["dice"],
                mode="markers",
                marker={"symbol": symbol, "size": 13, "color": color},
                name=name,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (part["dice_high"] - part["dice"]).fillna(0).tolist(),
                    "arrayminus": (part["dice"] - part["dice_low"]).fillna(0).tolist(),
                },
            )
        )
    figure.update_layout(
        title="Dice against the readers' consensus (95 % CIs over cases)",
        yaxis={"title": "Dice", "range": [0, 1.02]},
        height=460,
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
    )
    return figure


def _experts_download(report, table: str, label: str) -> None:
    st.download_button(
        label,
        lambda: exports.experts_csv(report, table, user_id=user.id),
        f"study-{report.study_id}-{report.arm}-{report.layer}-{table}.csv",
        "text/csv",
        key=f"results_experts_{report.study_id}_{table}_csv",
        on_click="ignore",
    )


def _experts_section(study, version: tuple, bootstrap: int, seed: int) -> None:
    """A regions study: every model's heatmaps held against the readers' drawings, beside the readers held against
    each other (services.studies.experts): one table, one figure, the readers' agreement."""
    st.subheader("Localisation against the experts")
    left, middle, right = st.columns(3)
    arm = left.selectbox("Arm", [a.name for a in study.arms], key=f"results_experts_arm_{study.id}")
    layer = middle.selectbox("Layer", list(study.layers), key=f"results_experts_layer_{study.id}")
    modality = next(a.modality for a in study.arms if a.name == arm)
    names = [m.name for m in repo.list_models(modality=modality)]
    models = right.multiselect(
        f"{modality} models", names, default=names, key=f"results_experts_models_{study.id}_{arm}"
    )
    titles = {row.method: row.title for row in studies.expert_map_rows(study.id, arm, models=models)} if models else {}
    methods = st.multiselect(
        "Heatmap methods (each model with each that applies to it)",
        [studies.OWN_MAP, *sorted(titles)],
        default=[studies.OWN_MAP],
        format_func=lambda m: "each model's own map" if m == studies.OWN_MAP else titles[m],
        key=f"results_experts_methods_{study.id}_{arm}",
    )
    problem = None
    with st.status("Holding the heatmaps against the experts...", expanded=False) as status:
        bar = st.progress(0.0, text="heatmaps of the cases")
        try:
            studies.prepare_expert_maps(
                study.id,
                arm,
                layer,
                models=models,
                methods=methods,
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} heatmaps computed"),
            )
            report = _experts_report(study.id, version, arm, layer, tuple(models), tuple(methods), bootstrap, seed)
        except studies.StudyError as error:
            problem = error
        status.update(label="Localisation against the experts", state="complete")
    if problem is not None:
        st.info(md_escape(problem))
        return
    for note in report.notes:
        st.info(md_escape(note))
    for model in report.report["models"]:
        dice = model["range"]["dice"]
        if dice["verdict"] is None:
            continue
        st.markdown(
            f"**{md_escape(model['row'])}**: Dice {dice['value']:.3f} against the consensus of all readers at "
            f"threshold {model['operating_threshold']:g}; readers against the others {dice['low']:.3f} to "
            f"{dice['high']:.3f}: **{_VERDICTS[dice['verdict']]}**."
        )
    st.caption(md_escape(report.rule))
    st.plotly_chart(
        _experts_figure(report.table),
        config=_figure_config(f"experts-{study.id}"),
        key=f"results_experts_{study.id}_figure",
    )
    st.dataframe(report.table, hide_index=True)
    _experts_download(report, "table", "Models and readers against the experts (CSV)")
    if not report.per_reader.empty:
        with st.expander("Each model against each reader alone"):
            st.dataframe(report.per_reader, hide_index=True)
            _experts_download(report, "per_reader", "Models against each reader (CSV)")
    st.markdown("**Agreement between readers**: Dice and IoU per pair, cases both left empty skipped")
    st.dataframe(report.pairwise, hide_index=True)
    _experts_download(report, "pairwise", "Pairwise agreement (CSV)")
    st.markdown("**Each reader against the STAPLE consensus of all readers**")
    st.dataframe(report.staple, hide_index=True)
    _experts_download(report, "staple", "STAPLE sensitivity and specificity (CSV)")
    if len(study.arms) > 1:
        st.markdown(
            f"**The arms side by side** (layer {md_escape(layer)}): time per case, drawings started from the AI's map, "
            f"the readers' agreement, and every drawing against the consensus of the first arm "
            f"({md_escape(study.arms[0].name)})"
        )
        st.dataframe(_arm_comparison(study.id, version, layer, bootstrap, seed), hide_index=True)


@st.cache_data(max_entries=8, show_spinner=False)
def _arm_comparison(study_id: int, version: tuple, layer: str, bootstrap: int, seed: int) -> pd.DataFrame:
    """Cached per study version, like the rest of the page's results."""
    return studies.arm_comparison(study_id, layer=layer, n_boot=bootstrap, seed=seed)


def _from_csv() -> None:
    st.caption(
        "Predictions: `case_id, truth, score`. Reads: `case_id, reader_id, label` and optionally `rating`, "
        "`rating_scale`, `score`, `arm` (the Studies page's export works as it is: its `score` is what the study's "
        "Results rank)."
    )
    left, right = st.columns(2)
    p_file = left.file_uploader("Predictions CSV", type=["csv"], key="results_p_csv")
    r_file = right.file_uploader("Reads CSV", type=["csv"], key="results_r_csv")
    threshold = st.number_input("CNN threshold", 0.0, 1.0, 0.5, 0.01, key="results_csv_threshold")
    scale = st.selectbox(
        "Ratings of a reads file without `score` or `rating_scale`",
        (None, "five", "hundred"),
        format_func={None: "ROC scores as given", "five": "answer + 1-5 confidence", "hundred": "0-100"}.get,
        key="results_csv_scale",
    )
    if p_file is None or r_file is None:
        return
    try:
        predictions = read_predictions(p_file.getvalue())
        reads = read_reads(r_file.getvalue(), predictions["case_id"], rating_scale=scale)
        report = analyze_reads(predictions, reads, threshold=threshold)
    except AnalysisError as error:
        st.error(f"{md_escape(error, multiline=True)}\n\nFix the file and upload it again.")
        return
    arms = report.get("arms") or {report.get("arm", ""): report}
    for name, arm_report in arms.items():
        arm_report["roc_band"] = results_service.roc_band(
            predictions["truth"].to_numpy(), predictions["score"].to_numpy()
        )
        _arm_panel(name or "all reads", arm_report, predictions, reads[reads["arm"] == name], key=f"results_csv_{name}")


st.title("Results")
source = st.radio("Data", ("A study", "Uploaded CSV files"), horizontal=True, key="results_source")
if source == "A study":
    _from_study()
else:
    _from_csv()
