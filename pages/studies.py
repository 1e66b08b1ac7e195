"""Studies (PI): set up blind reader studies, follow each reader's progress, close them, export and import reads,
and read the audit log."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table
from core.text import md_escape
from core.train import DECISIONS
from db import repo
from db.audit import audit_table
from db.models import MODALITIES
from services import exports, studies
from services.studies import STUDY_TASKS, ArmSpec, StudyError, StudyInfo

user = require_role("pi")
_NO_HEATMAP = "none"
_OWN_MAP = "default"  # the model's own map: MLCAM-LICI's, CompSegNet's, Tissue MIL's, CELM for a CeLNet, else Grad-CAM
_HEATMAPS = (_NO_HEATMAP, _OWN_MAP, "gradcam", "cam", "guided-gradcam", "scorecam")
_TASKS = tuple(STUDY_TASKS)
_TASK_HELP = (
    "Tumor, grade and Ki-67 ask about specimens (FL, WL); diagnostic asks whether a CLE frame shows diagnostic "
    "features; aspecific whether an RCM mosaic holds an aspecific region. Heatmap 'default' is the model's own map."
)


def _arms_editor(task: str, regions: bool) -> list[ArmSpec] | None:
    """The arms as an editable table (starting from the modalities ``task`` is asked of; in a regions study also the
    level of the AI's map a drawing may start from); None (with the reason shown) when a row is incomplete."""
    models = {m.name: m for m in repo.list_models() if m.task == task}
    modalities = ("FL", "WL") if task in ("tumor", "grade", "ki67") else STUDY_TASKS[task][:1]
    default = pd.DataFrame(
        [
            {"name": modality, "modality": modality, "model": None, "probability": False, "decision": False}
            for modality in modalities
        ]
    ).assign(heatmap=_NO_HEATMAP, washout_days=0)
    if regions:
        default = default.assign(start=None)
    edited = st.data_editor(
        default,
        num_rows="dynamic",
        hide_index=True,
        key=f"studies_arms_{task}_{int(regions)}",
        column_config={
            "name": st.column_config.TextColumn("Arm", required=True, max_chars=64),
            "modality": st.column_config.SelectboxColumn("Modality", options=MODALITIES, required=True),
            "model": st.column_config.SelectboxColumn("AI model (aided arms)", options=list(models)),
            "probability": st.column_config.CheckboxColumn("Show probability"),
            "decision": st.column_config.CheckboxColumn("Show decision"),
            "heatmap": st.column_config.SelectboxColumn("Show heatmap", options=_HEATMAPS),
            "washout_days": st.column_config.NumberColumn("Wash-out (days)", min_value=0, max_value=365, step=1),
            "start": st.column_config.NumberColumn(
                "Drawing starts from the AI map at",
                min_value=0.01,
                max_value=0.99,
                step=0.01,
                help="Aided arms of a regions study: the model's heatmap at this level is each case's editable start.",
            ),
        },
    )
    arms = []
    for row in edited.to_dict("records"):
        if not row.get("name") or not row.get("modality"):
            st.warning("Every arm needs a name and a modality.")
            return None
        model = models.get(row.get("model") or "")
        arms.append(
            ArmSpec(
                name=str(row["name"]),
                modality=row["modality"],
                model_id=model.id if model else None,
                show_probability=bool(row.get("probability")),
                show_decision=bool(row.get("decision")),
                heatmap_method=None if row.get("heatmap") in (None, _NO_HEATMAP) else row["heatmap"],
                washout_days=int(row.get("washout_days") or 0),
                start_threshold=None if pd.isna(row.get("start")) else float(row["start"]),
            )
        )
    return arms


def _new_study() -> None:
    st.subheader("New study")
    title = st.text_input("Title", key="studies_title", placeholder="e.g. FL vs WL, three neurosurgeons")
    description = st.text_area("Instructions for readers (optional)", key="studies_description")
    task = st.selectbox(
        "Question", _TASKS, format_func=lambda t: " / ".join(DECISIONS[t]), key="studies_task", help=_TASK_HELP
    )
    question = st.radio(
        "Readers",
        ("label", "regions"),
        format_func={"label": "answer the question", "regions": "draw the regions that carry the diagnosis"}.get,
        horizontal=True,
        key="studies_question",
    )
    layers = ("region",)
    if question == "regions":
        typed = st.text_input(
            "Layers (one, or two separated by a comma)",
            value="region",
            max_chars=70,
            key="studies_layers",
            help="e.g. 'intermediate, restrictive' for seed 000's two scales of features",
        )
        layers = tuple(part.strip() for part in typed.split(",") if part.strip())
    st.markdown("**Arms**: what readers see in each reading condition, read in this order.")
    arms = _arms_editor(task, question == "regions")
    if arms is None:
        return
    splits = st.multiselect("Cases from the splits", ("test", "val", "train"), default=["test"], key="studies_splits")
    try:
        pools = studies.case_pools(task=task, modalities=[a.modality for a in arms], splits=splits)
    except StudyError as error:
        st.error(md_escape(error))
        return
    readers = [u for u in repo.list_users() if u.role == "reader"]
    eligible = pools.eligible
    if eligible.empty:
        st.warning("No specimen in these splits has an image in every arm's modality and a known label.")
        return
    counts = eligible["truth"].value_counts()
    st.caption(
        f"{len(eligible)} eligible specimens: {counts.get(1, 0)} {DECISIONS[task][1]}, "
        f"{counts.get(0, 0)} {DECISIONS[task][0]}."
    )
    columns = st.columns(3)
    limit = columns[0].number_input(
        "Cases (a random sample; all by default)", 1, len(eligible), len(eligible), key="studies_limit"
    )
    n_training = columns[1].number_input(
        "Training cases shown with truth first", 0, min(20, len(pools.training)), 0, key="studies_training"
    )
    scale = columns[2].radio(
        "Confidence scale",
        ("five", "hundred"),
        format_func={"five": "5-point", "hundred": "0-100"}.get,
        horizontal=True,
        key="studies_scale",
    )
    revisions = st.checkbox("Readers may go back and correct answers (kept as versions)", key="studies_revisions")
    invited = st.multiselect(
        "Readers",
        [u.id for u in readers],
        format_func={u.id: f"{u.display_name} ({u.username})" for u in readers}.get,
        key="studies_readers",
    )
    if st.button("Create study", type="primary", key="studies_create"):
        try:
            chosen, training = studies.sample_cases(pools, int(limit), int(n_training))
            study = studies.create_study(
                title=title,
                description=description,
                task=task,
                specimen_ids=chosen,
                arms=arms,
                rating_scale=scale,
                allow_revisions=revisions,
                training_specimen_ids=training,
                reader_ids=invited,
                created_by=user.id,
                question=question,
                layers=layers,
            )
        except StudyError as error:
            st.error(md_escape(error))
            return
        if any(a.aided for a in study.arms):
            from services.study_ai import prepare_study_ai

            bar = st.progress(0.0, "Computing the AI output the aided arms show...")
            prepare_study_ai(study.id, progress=lambda done, total: bar.progress(done / total, f"{done} of {total}"))
        st.session_state["studies_open"] = study.id
        st.session_state["studies_flash"] = f"Study “{md_escape(study.title)}” created with {study.n_cases} cases."
        st.rerun()


def _study_view(study: StudyInfo) -> None:
    badges = [study.status, "frozen (has reads)" if study.frozen else "editable (no reads yet)"]
    if study.simulated:
        badges.append("SIMULATED reads")
    st.markdown(f"### {md_escape(study.title)}  \n" + " · ".join(f"`{b}`" for b in badges))
    if study.description:
        st.caption(md_escape(study.description, multiline=True))
    asks = (
        f"readers draw the regions ({', '.join(study.layers)}) for {study.labels[1]}"
        if study.question == "regions"
        else f"question {' / '.join(study.labels)}, confidence {'1-5' if study.rating_scale == 'five' else '0-100'}"
    )
    st.markdown(
        f"{study.n_cases} cases ({study.n_training} training), {md_escape(asks)}, corrections "
        f"{'allowed' if study.allow_revisions else 'not allowed'}.  \n"
        + "  \n".join(f"Arm {a.position + 1}: {md_escape(a.describe())}" for a in study.arms)
    )
    progress = studies.study_progress(study.id)
    readers = [u for u in repo.list_users() if u.role == "reader" and u.id not in study.reader_ids]
    if not progress.empty:
        total = progress["answered"].sum() / max(1, len(progress) * study.n_cases)
        st.progress(float(total), f"{total:.0%} of all reads done")
        st.dataframe(progress, hide_index=True)
    else:
        st.info("No reader invited yet.")
    left, right = st.columns(2)
    with left:
        if readers:
            more = st.multiselect(
                "Invite readers",
                [u.id for u in readers],
                format_func={u.id: f"{u.display_name} ({u.username})" for u in readers}.get,
                key=f"studies_invite_{study.id}",
            )
            if more and st.button("Invite", key=f"studies_invite_go_{study.id}"):
                studies.invite_readers(study.id, more, user_id=user.id)
                st.rerun()
    with right:
        closing = study.status == "open"
        if st.button("Close the study" if closing else "Reopen the study", key=f"studies_status_{study.id}"):
            studies.set_status(study.id, "closed" if closing else "open", user_id=user.id)
            st.rerun()
    _edit(study)
    _exports(study)
    _import(study)
    with st.expander("Audit log of this study"):
        filterable_table(
            audit_table(study.id), key=f"studies_audit_{study.id}", file_name="audit.csv", what="audit log",
            study_id=study.id,
        )  # fmt: skip


def _edit(study: StudyInfo) -> None:
    """Title, instructions and corrections can change at any time (audited); cases and arms are fixed at creation."""
    with st.expander("Edit title, instructions, corrections"):
        with st.form(f"studies_edit_{study.id}", border=False):
            title = st.text_input("Title", study.title, key=f"studies_edit_title_{study.id}")
            description = st.text_area(
                "Instructions for readers", study.description, key=f"studies_edit_text_{study.id}"
            )
            revisions = st.checkbox(
                "Readers may go back and correct answers", study.allow_revisions, key=f"studies_edit_rev_{study.id}"
            )
            saved = st.form_submit_button("Save", key=f"studies_edit_save_{study.id}")
        st.caption("Cases and arms are fixed when a study is created; for other ones, create a new study.")
    if saved:
        try:
            studies.update_study(
                study.id, user_id=user.id, title=title, description=description, allow_revisions=revisions
            )
        except StudyError as error:
            st.error(md_escape(error))
            return
        st.rerun()


def _exports(study: StudyInfo) -> None:
    """Downloads built only when clicked (each is audited by ``services.exports``), not on every rerun."""

    def reads(history: bool) -> Callable[[], bytes]:
        return lambda: exports.reads_csv(study.id, user_id=user.id, history=history)

    def cases() -> bytes:
        return exports.cases_csv(study.id, user_id=user.id)

    st.markdown(f"**Export** (long format: `case_id, reader_id, arm, label, rating, ...`; label 1 = {study.labels[1]})")
    columns = st.columns(3)
    columns[0].download_button("Reads (latest answers)", reads(False), f"study-{study.id}-reads.csv", "text/csv",
                               key=f"studies_x_reads_{study.id}", on_click="ignore")  # fmt: skip
    columns[1].download_button("Answer history (all versions)", reads(True), f"study-{study.id}-history.csv",
                               "text/csv", key=f"studies_x_history_{study.id}", on_click="ignore")  # fmt: skip
    columns[2].download_button("Cases with truth", cases, f"study-{study.id}-cases.csv", "text/csv",
                               key=f"studies_x_cases_{study.id}", on_click="ignore")  # fmt: skip
    if study.question == "regions":
        st.download_button(
            "Drawn masks (zip: PNG per arm, layer, reader and case, and COCO RLE JSON)",
            lambda: studies.masks_zip(study.id, user_id=user.id),
            f"study-{study.id}-masks.zip",
            "application/zip",
            key=f"studies_x_masks_{study.id}",
            on_click="ignore",
        )
        st.caption(
            "Agreement from the command line: `python -m core studies export-masks "
            f"{study.id} --out masks/` then `python -m core agreement --masks masks/ --out report.json`."
        )


def _import(study: StudyInfo) -> None:
    with st.expander("Import reads collected elsewhere (CSV in the export format)"):
        upload = st.file_uploader("Reads CSV", type=["csv"], key=f"studies_import_{study.id}")
        create = st.checkbox(
            "Create (inactive) reader accounts for unknown reader ids", key=f"studies_import_create_{study.id}"
        )
        as_active = st.checkbox(
            "Allow reads under existing, active reader accounts (only if these are their own answers; the audit log "
            "names the readers and cases)",
            key=f"studies_import_active_{study.id}",
        )
        if upload is not None and st.button("Import", key=f"studies_import_go_{study.id}"):
            report = studies.import_reads(
                study.id, upload.getvalue(), user_id=user.id, create_readers=create, allow_active_readers=as_active
            )
            if report.errors:
                st.error(
                    f"Nothing was imported: {len(report.errors)} problem(s) in {report.rows} row(s). "
                    "Fix them in the file and import it again."
                )
                st.dataframe(pd.DataFrame({"problem": report.errors}), hide_index=True)
            else:
                created = (
                    f"; new reader accounts: {md_escape(', '.join(report.created_readers))}"
                    if report.created_readers
                    else ""
                )
                st.success(f"Imported {report.imported} reads{created}.")


st.title("Reader studies")
if "studies_flash" in st.session_state:
    st.success(st.session_state.pop("studies_flash"))
all_studies = studies.list_studies()
overview, create = st.tabs(["Studies", "New study"])
with create:
    _new_study()
with overview:
    if not all_studies:
        st.info("No study yet: create one in the “New study” tab.")
    else:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "id": s.id,
                        "title": s.title + (" (simulated)" if s.simulated else ""),
                        "status": s.status,
                        "arms": ", ".join(a.name for a in s.arms),
                        "cases": s.n_cases,
                        "readers": len(s.reader_ids),
                        "frozen": s.frozen,
                        "created": s.created_at,
                    }
                    for s in all_studies
                ]
            ),
            hide_index=True,
        )
        by_id = {s.id: s for s in all_studies}
        if st.session_state.get("studies_open") in by_id:  # just created: open it
            st.session_state["studies_pick"] = st.session_state.pop("studies_open")
        chosen = st.selectbox("Open a study", list(by_id), format_func=lambda i: by_id[i].title, key="studies_pick")
        _study_view(by_id[chosen])
